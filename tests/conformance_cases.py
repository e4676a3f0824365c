"""Shared cases of the conformance suite (issue 19): the handles, the parametrisation, the known
failures and the comparisons.

The promise checked (docs/DESIGN.md §1, "A plugin must also be invisible"): with nothing pruned
(keep=1.0) a patched model is indistinguishable from the plain one on every path transformers'
model and generation test mixins take; with pruning, every path either works (keeping the
invariants: cached == uncached, same as the method's own default path) or raises a
:class:`vtoken.errors.VTokenError` that says what to do. A raw ``RuntimeError`` / ``IndexError`` /
``ValueError`` out of vtoken's hooks is a failure.

Every adapter (``conftest.ARCHS``) runs with two handles of each pruning family:

* ``pre``    — a stage before the LLM: DivPrune at layer 0 (select);
* ``select`` — an in-LLM select stage: FastV at K=1 (the tiny models have 4 decoder layers);
* ``merge``  — an in-LLM merge stage: FastV at K=1, ``mode="merge"`` (dropped tokens averaged
  into kept ones);
* ``multi``  — two in-LLM stages: PyramidDrop at layers 1 and 3;

once keeping everything (``keep=1.0``, "keepall") and once pruning ("pruned").

Known failures are listed once, in :data:`KNOWN`, and turn into ``xfail(strict=True)`` marks on
the matching parametrised cases: a fix makes the case XPASS, which fails the run until its rule
here is removed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import transformers
from packaging.version import Version
from torch.utils.checkpoint import CheckpointError

import vtoken
from conftest import ARCHS, SUPPRESS
from vtoken.errors import PruningConfigError, UnsupportedCallError, VTokenError

TRANSFORMERS = Version(transformers.__version__)

ARCH_NAMES = tuple(ARCHS)
LLAVA_NEXT_LIKE = ("llava_next", "llava_onevision")
LLAVA_FAMILY = ("llava",) + LLAVA_NEXT_LIKE
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

#: family -> (method, options, budget when pruning)
FAMILIES = {
    "pre": ("divprune", {}, 4),
    "select": ("fastv", {"K": 1}, 4),
    "merge": ("fastv", {"K": 1, "mode": "merge"}, 4),
    "multi": ("pyramiddrop", {"layers": (1, 3)}, 2),  # budgets 4 then 2 per image
}
FAMILY_NAMES = tuple(FAMILIES)
KEEPS = ("keepall", "pruned")

#: greedy generation of a fixed length (placeholder ids suppressed, as in the other suites)
GEN = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS)

#: tolerance of "equal" float outputs (scores, logits, hidden states, gradients) of the same
#: computation run twice (keep-all vs plain); cache vs no-cache of a pruned run computes the same
#: values along another path (different shapes), hence the looser one
TIGHT = dict(rtol=1e-5, atol=1e-5)
LOOSE = dict(rtol=1e-4, atol=1e-4)


def apply(model, family: str, keep: str):
    """Attach the ``family`` handle to ``model``; ``keep``: "keepall" (keep=1.0) or "pruned"."""
    method, options, budget = FAMILIES[family]
    return vtoken.apply_pruning(model, method=method, keep=1.0 if keep == "keepall" else budget, **options)


# ------------------------------------------------------------------------------------ known failures
@dataclass(frozen=True)
class Known:
    """A known failure: the cases of ``test`` matching ``archs`` / ``families`` / ``keeps`` /
    ``extra`` (None matches anything) xfail strictly with ``reason``; ``raises``: the exception
    type seen (AssertionError: a wrong result; None: any); ``until``: the failure is only seen
    with transformers older than this version (it passes from that version on)."""

    test: str
    reason: str
    archs: Optional[tuple] = None
    families: Optional[tuple] = None
    keeps: Optional[tuple] = None
    extra: Optional[tuple] = None
    raises: Optional[type] = None
    until: Optional[str] = None

    def matches(self, test, arch, family, keep, extra) -> bool:
        if self.until is not None and TRANSFORMERS >= Version(self.until):
            return False
        return test == self.test and all(
            want is None or got in want
            for want, got in ((self.archs, arch), (self.families, family), (self.keeps, keep), (self.extra, extra)))

    def mark(self):
        kw = {"raises": self.raises} if self.raises is not None else {}
        return pytest.mark.xfail(strict=True, reason=self.reason, **kw)


IN_LLM = ("select", "merge", "multi")


def known_rule(test, arch, family, keep, extra=None) -> Optional[Known]:
    """The KNOWN rule covering a case, or None."""
    return next((k for k in KNOWN if k.matches(test, arch, family, keep, extra)), None)


def cases(test: str, archs=ARCH_NAMES, families=FAMILY_NAMES, keeps=KEEPS, extras=(None,)) -> list:
    """``pytest.param`` list over archs x families x keeps (x extras), xfail-marked per KNOWN."""
    out = []
    for arch in archs:
        for family in families:
            for keep in keeps:
                for extra in extras:
                    rule = known_rule(test, arch, family, keep, extra)
                    marks = [rule.mark()] if rule is not None else []
                    values = (arch, family, keep) if extras == (None,) else (arch, family, keep, extra)
                    ident = "-".join(str(v) for v in values)
                    out.append(pytest.param(*values, marks=marks, id=ident))
    return out


#: the names of the parameter that follows arch, family, keep in the parametrised tests
EXTRA_PARAMS = ("mode", "cache", "how", "form", "prompt", "pad", "return_dict")


def short_known_failures(test):
    """Decorator of a parametrised conformance test: a case's known failure (the exception type of
    its KNOWN rule) is re-raised without its traceback. pytest formats the full traceback of every
    xfail, through torch and transformers frames: ~0.6 s each on 2 cores, a minute for the suite.
    Any other exception (an unexpected failure, or a known case failing another way) keeps its
    traceback."""

    @functools.wraps(test)
    def run(**kwargs):
        try:
            return test(**kwargs)
        except Exception as err:
            extra = next((kwargs[name] for name in EXTRA_PARAMS if name in kwargs), None)
            rule = known_rule(test.__name__, kwargs.get("arch"), kwargs.get("family"), kwargs.get("keep"), extra)
            if rule is not None and isinstance(err, rule.raises or AssertionError):
                raise err.with_traceback(None) from None
            raise

    return run


# ------------------------------------------------------------------------------------ comparisons
def assert_close_nested(a, b, what: str = "", **tol):
    """Nested tuples/lists of tensors (or None): same structure, shapes and values."""
    tol = tol or TIGHT
    if a is None or b is None:
        assert a is None and b is None, f"{what}: {type(a).__name__} vs {type(b).__name__}"
        return
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), f"{what}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_nested(x, y, f"{what}[{i}]", **tol)
        return
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {m}", **tol)


OUTPUT_FIELDS = ("scores", "logits", "hidden_states", "attentions", "sequences_scores", "beam_indices")


def assert_same_tokens(a, b, name_a="got", name_b="expected", tail: int = 6):
    """Same token ids; the message shows the rows' last ``tail`` tokens (the generated ones)."""
    assert a.shape == b.shape, f"{name_a} {tuple(a.shape)} vs {name_b} {tuple(b.shape)}"
    assert torch.equal(a, b), f"tokens differ; last {tail} of each row:\n{name_a}: {a[:, -tail:].tolist()}\n" \
                              f"{name_b}: {b[:, -tail:].tolist()}"


def assert_same_generation(out, ref, **tol):
    """Two ``generate`` results: same tokens; every float output present in either one equal."""
    if torch.is_tensor(ref):
        assert_same_tokens(out, ref)
        return
    assert_same_tokens(out.sequences, ref.sequences)
    for name in OUTPUT_FIELDS:
        a, b = getattr(out, name, None), getattr(ref, name, None)
        if name == "beam_indices" and a is not None and b is not None:
            assert torch.equal(a, b), name
            continue
        assert_close_nested(a, b, name, **tol)


#: a refusal says what to do: it names an alternative or an action
_ADVICE = re.compile(r"\b(use|pass|call|instead|leave|remove|without|set|needs)\b", re.IGNORECASE)


def check_refusal(err: BaseException) -> None:
    assert isinstance(err, VTokenError), f"{type(err).__name__} is not a VTokenError: {err}"
    assert _ADVICE.search(str(err)), f"the refusal does not say what to do: {err}"


def works_or_refuses(fn):
    """``fn()``'s result, or None when it raised a VTokenError that says what to do; any other
    exception propagates (and fails the test)."""
    try:
        return fn()
    except VTokenError as err:
        check_refusal(err)
        return None


@pytest.fixture(autouse=False)
def one_thread():
    """torch on one intra-op thread while a conformance test runs: these tiny models gain nothing
    from two, and on a shared 2-core machine the second thread's spin-waits made some generate
    calls ~100x slower (1.7 s instead of 0.02 s). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_case(keep: str, fn):
    """Run ``fn()`` for a case: keep-all must simply work (any exception propagates, a VTokenError
    included: nothing is pruned, so nothing may be refused); pruned: :func:`works_or_refuses`."""
    return fn() if keep == "keepall" else works_or_refuses(fn)


def fresh_model(arch: str, attn: str = "sdpa"):
    """A model of its own (same weights as ``conftest.get_model``'s) for a test that changes it
    (train mode, gradient checkpointing, attention implementation, compiled forward)."""
    return ARCHS[arch][0](attn)


def reset_rope_deltas(model) -> None:
    """Qwen-VL models keep the last call's ``rope_deltas`` on the model and reuse them for a call
    without input_ids: two runs compared start from the same state."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


# ------------------------------------------------------------------------------------ the known failures
# Every known failure of the suite, in one place: what the fix of issue 19 works from. A rule names
# the test function, the cases it covers, the exception seen (AssertionError: a wrong result) and
# where in vtoken it arises. Function names are given with the line numbers (hooks/runtime.py is
# being split, issue 18: the names survive the move).

_ITEM7_MERGE_REPLAY = (
    "issue 19 item 7: merge mode breaks cache == no cache: the no-cache replay (hooks/runtime.py "
    "Runtime._run_stage, `if ctx.mode == 'replay'` branch, ~line 575) re-lays out the prompt's kept positions but "
    "does not merge the dropped tokens into the kept ones as the prefill did (`_merge`, ~line 616): tokens and "
    "scores differ from the 2nd generated token on")
_MERGE_KEEPALL = (
    "keep-all merge is not the plain model: Runtime._run_stage (hooks/runtime.py ~line 630, `if nothing_dropped and "
    "stage.mode == 'select'`) keeps the model's own layout and masks only for select stages; a merge stage that "
    "drops nothing still re-lays out (`_relayout`: vtoken's mask, new padding on the left)")
_ITEM6_EMBEDS = (
    "issue 19 item 6: a forward with inputs_embeds and no input_ids is refused even at keep 1.0 "
    "(UnsupportedCallError from Runtime.on_multimodal_call, hooks/runtime.py ~line 290); at keep-all it must pass "
    "through")
_ITEM2_CHECKPOINT = (
    "issue 19 item 2: gradient checkpointing recomputes a layer in backward after the forward's thread-local call "
    "state is gone (Runtime.on_multimodal_done sets tls.ctx = None, hooks/runtime.py ~line 337): the probe "
    "(Runtime.probe's run, ~line 514) and the layer pre-hook (Runtime.on_layer, ~line 482) then run the layer "
    "differently: torch.utils.checkpoint.CheckpointError 'A different number of tensors was saved'")

KNOWN = (
    # ---------------------------------------------------------------- generate
    Known("test_generate_modes", _ITEM7_MERGE_REPLAY, families=("merge",), keeps=("pruned",), raises=AssertionError),
    Known("test_generate_modes", _MERGE_KEEPALL + ": Qwen-VL's hidden states of padding slots differ from layer K on",
          archs=QWEN, families=("merge",), keeps=("keepall",), extra=("greedy",), raises=AssertionError),
    Known("test_output_attentions", _MERGE_KEEPALL + ": the attention rows of padding slots differ from layer K on",
          families=("merge",), keeps=("keepall",), raises=AssertionError),
    Known("test_output_attentions", _ITEM7_MERGE_REPLAY, families=("merge",), keeps=("pruned",), raises=AssertionError),
    Known("test_cache_classes", _ITEM7_MERGE_REPLAY, families=("merge",), keeps=("pruned",), extra=("no_cache",),
          raises=AssertionError),
    Known("test_generate_from_inputs_embeds", _ITEM6_EMBEDS + "; generate(input_ids=..., inputs_embeds=...) also "
          "reaches the model with inputs_embeds only (transformers drops input_ids from the prefill's inputs)",
          keeps=("keepall",), extra=("with_ids", "without_ids"), raises=UnsupportedCallError),
    Known("test_generated_placeholder_id",
          "issue 19 item 4: a decode step whose new token is an image placeholder id, on a cache whose prefill "
          "vtoken did not prune (text-only prompt, inputs_embeds prefill), is laid out as a prefill with the 2-D mask "
          "of the whole sequence: IndexError at hooks/prefill_plan.py:164 (prepare_prefill, `seg[b_idx, slot]`) from "
          "Runtime.on_text_call (hooks/runtime.py ~line 414)", raises=IndexError),
    Known("test_padding_and_batch", _MERGE_KEEPALL + ": right-padded rows come back moved (logits at other slots)",
          families=("merge",), keeps=("keepall",), extra=("right",), raises=AssertionError),
    # ---------------------------------------------------------------- model forward paths
    Known("test_forward_inputs_embeds_without_ids", _ITEM6_EMBEDS, keeps=("keepall",), raises=UnsupportedCallError),
    Known("test_prebuilt_attention_masks",
          "issue 19 item 6: a 4-D or dict attention mask is refused even at keep 1.0 (PruningConfigError from "
          "Runtime.on_text_call -> _bad_mask, hooks/runtime.py ~lines 369 and 887); at keep-all it must pass through",
          keeps=("keepall",), raises=PruningConfigError),
    Known("test_switch_to_eager_after_apply", _MERGE_KEEPALL + ": the attention rows of padding slots differ",
          families=("merge",), keeps=("keepall",), raises=AssertionError),
    Known("test_get_image_features",
          "issue 19 item 1: get_image_features(..., return_dict=False) with a handle attached: AttributeError "
          "'list' object has no attribute 'shape' in the LlavaNextAdapter.install wrapper "
          "(vtoken/adapters/llava.py:143), "
          "which takes the returned tuple for the list of per-image features", extra=(False,), raises=AttributeError),
    # ---------------------------------------------------------------- training
    Known("test_labels_loss",
          "issue 19 item 5: labels while pruning: the logits come back in the pruned layout (Runtime._relayout, "
          "hooks/runtime.py) while labels keep the prompt's length, nothing gathers them: ValueError 'Expected input "
          "batch_size (..) to match target batch_size (..)' in transformers' causal-LM loss",
          keeps=("pruned",), raises=ValueError),
    Known("test_labels_loss", _MERGE_KEEPALL + ": Qwen-VL's padding-slot logits differ, and the model's "
          "shift-by-one loss reads the last padding slot of each left-padded row", archs=QWEN, families=("merge",),
          keeps=("keepall",), raises=AssertionError),
    Known("test_gradient_checkpointing", _ITEM2_CHECKPOINT, families=IN_LLM, keeps=("keepall",),
          raises=CheckpointError),
    Known("test_gradient_checkpointing", _ITEM2_CHECKPOINT + "; with tokens pruned, transformers 5.17 fails earlier: the "
          "recomputed layers get the unpruned sequence, RuntimeError 'The size of tensor a (..) must match the size of "
          "tensor b (..)' (CheckpointError is a RuntimeError)", families=IN_LLM, keeps=("pruned",),
          raises=RuntimeError),
    Known("test_gradient_checkpointing", _ITEM2_CHECKPOINT + " (transformers < 5.2x: also with a layer-0 stage; "
          "passes on 5.25)", families=("pre",), keeps=("keepall",), raises=CheckpointError, until="5.25"),
    Known("test_gradient_checkpointing",
          "issue 19 item 2 (transformers < 5.2x, passes on 5.25): with a pruning layer-0 stage the checkpointed "
          "layers are recomputed on the unpruned sequence: RuntimeError 'The size of tensor a (..) must match the "
          "size of tensor b (..)'", families=("pre",), keeps=("pruned",), raises=RuntimeError, until="5.25"),
)
