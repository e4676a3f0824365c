"""``vtoken eval`` preprocesses each batch once (:class:`vtoken.eval.memo.MemoProcessor`).

Expectations: the memoised run's answers equal a run whose processor is the plain one (the
independent path), on the built-in tiny LLaVA over several methods (a hook that changed an input
tensor in place would make a later method see other inputs, and this comparison fail); the
processor runs once per distinct batch; a change in the arguments (text, image identity, the
tokenizer's padding side) is a new call; the byte bound drops the oldest entries.
"""

from __future__ import annotations

import pytest
import torch

from vtoken.eval.memo import MemoProcessor


class _Tok:
    padding_side = "right"


class _Proc:
    """Counts calls; the output depends on every argument."""

    def __init__(self):
        self.calls = 0
        self.tokenizer = _Tok()

    def __call__(self, images=None, text=None, **kwargs):
        self.calls += 1
        seed = sum(len(t) for t in text) + (7 if self.tokenizer.padding_side == "left" else 0)
        return {"input_ids": torch.full((len(text), 4), seed), "pixel_values": torch.zeros(len(images), 3, 8, 8)}

    def batch_decode(self, x):
        return ["decoded"] * len(x)


def test_repeated_call_is_served_once_and_is_a_fresh_mapping():
    proc = _Proc()
    memo = MemoProcessor(proc)
    img = object()
    a = memo(images=[img], text=["q1"], padding=True)
    a["input_ids"] = None  # a caller that replaces an entry does not change the stored output
    b = memo(images=[img], text=["q1"], padding=True)
    assert proc.calls == 1 and (memo.hits, memo.misses) == (1, 1)
    assert torch.equal(b["input_ids"], torch.full((1, 4), 2))
    assert memo.batch_decode([1, 2]) == ["decoded", "decoded"]  # other attributes: the processor's


def test_any_changed_argument_is_a_new_call():
    proc = _Proc()
    memo = MemoProcessor(proc)
    img, other = object(), object()
    memo(images=[img], text=["q1"])
    memo(images=[other], text=["q1"])  # another image object, even if equal in content
    memo(images=[img], text=["q2"])
    memo(images=[img], text=["q1"], padding=True)
    proc.tokenizer.padding_side = "left"
    out = memo(images=[img], text=["q1"])
    assert proc.calls == 5 and memo.hits == 0
    assert int(out["input_ids"][0, 0]) == 2 + 7


def test_byte_bound_drops_the_oldest():
    proc = _Proc()
    one = 1 * 3 * 8 * 8 * 4 + 4 * 8  # pixel_values + input_ids of one question
    memo = MemoProcessor(proc, max_bytes=2 * one)
    imgs = [object() for _ in range(3)]
    for im in imgs:
        memo(images=[im], text=["q"])
    memo(images=[imgs[2]], text=["q"])  # newest: kept
    assert proc.calls == 3
    memo(images=[imgs[0]], text=["q"])  # oldest: dropped, computed again
    assert proc.calls == 4


@pytest.mark.slow
def test_eval_answers_equal_the_unmemoised_run(tmp_path):
    from vtoken import zoo
    from vtoken.eval.backend import load_backend
    from vtoken.eval.config import EvalConfig
    from vtoken.eval.runner import run_eval

    if "vtoken/tiny-llava" not in zoo.available():
        pytest.skip("built-in checkpoint not installed")
    preds = {}
    for memo in (False, True):
        backend = load_backend("vtoken/tiny-llava", device="cpu", dtype="float32", max_new_tokens=2,
                               memo_inputs=memo)
        calls = {"n": 0}
        if memo:  # count the calls that reach the real processor
            backend.processor._processor = _Counting(backend.processor._processor, calls)  # noqa: SLF001
        else:
            backend.processor = _Counting(backend.processor, calls)
        cfg = EvalConfig(model="vtoken/tiny-llava", data=["synthetic"], methods=["fastv", "divprune", "sparsevlm"],
                         keeps=[64], limit=12, batch_size=4, out=str(tmp_path / f"memo{memo}"), progress=False,
                         max_new_tokens=2)
        run_eval(cfg, backend=backend)
        preds[memo] = (tmp_path / f"memo{memo}" / "predictions.jsonl").read_text().splitlines()
        # none + 3 methods, 3 batches each; memoised: each batch once
        assert calls["n"] == (3 if memo else 12)
    strip = [sorted(_answers(p)) for p in (preds[False], preds[True])]
    assert strip[0] == strip[1] and len(strip[0]) == 48


class _Counting:
    def __init__(self, inner, calls):
        self._inner, self._calls = inner, calls
        self.__wrapped__ = getattr(inner, "__wrapped__", inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *a, **k):
        self._calls["n"] += 1
        return self._inner(*a, **k)


def _answers(lines):
    import json

    out = []
    for line in lines:
        r = json.loads(line)
        out.append((r["method"], str(r["keep"]), r["id"], r["prediction"]))
    return out
