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

import vtoken
from conftest import ARCHS, SUPPRESS
from vtoken.errors import VTokenError

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
# Every known failure of the suite, in one place: a rule names the test function, the cases it
# covers, the exception seen (AssertionError: a wrong result) and where in vtoken it arises, e.g.
#   Known("test_labels_loss", "what goes wrong, and where", keeps=("pruned",), raises=ValueError)
# Empty: the failures this suite found (issue 19 items 1, 2, 4-7 and keep-all merge stages) are fixed.
KNOWN = ()
