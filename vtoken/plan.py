"""Stages and plans: *where* to prune, *with which scorer*, *how many* tokens to keep.

A plan is an ordered list of :class:`Stage`. A method name (``"fastv"``) is a preset plan built
by a function in the method registry (:mod:`vtoken.methods`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Union

from vtoken.errors import PruningConfigError

#: keep: int = visual tokens kept per image (segment); float in (0, 1] = fraction of each
#: image's ORIGINAL visual tokens.
Budget = Union[int, float]


def validate_budget(keep: Any, what: str = "keep") -> Budget:
    """Return ``keep`` if it is a valid budget, else raise a clear :class:`PruningConfigError`."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise PruningConfigError(
            f"{what} must be an int (visual tokens kept per image) or a float in (0, 1] "
            f"(fraction of each image's visual tokens); got {type(keep).__name__} {keep!r}"
        )
    if isinstance(keep, numbers.Integral):
        if keep <= 0:
            raise PruningConfigError(f"{what} must be a positive number of tokens per image; got {keep}")
        return int(keep)
    keep = float(keep)
    if not math.isfinite(keep) or keep <= 0.0 or keep > 1.0:
        raise PruningConfigError(
            f"{what} as a float is a fraction of each image's visual tokens and must lie in (0, 1]; got {keep}. "
            "Pass an int for an absolute number of tokens."
        )
    return keep


#: how a multi-stage preset counts its ``keep``: "final" = tokens left after its last stage,
#: "equivalent" = layer-averaged tokens, the papers' convention (docs/DESIGN.md section 4)
BUDGET_COUNTS = ("final", "equivalent")


def check_budget_count(budget: str, method: str) -> str:
    """``budget`` if it is one of :data:`BUDGET_COUNTS`, else a clear :class:`PruningConfigError`."""
    if budget not in BUDGET_COUNTS:
        raise PruningConfigError(f"{method} budget must be 'equivalent' or 'final'; got {budget!r}")
    return budget


def scaled_table_budgets(keep: Budget, tables: dict, reference_tokens: int, budget: str, method: str) -> tuple:
    """Per-stage budgets from a released table of per-stage token counts (``tables``: nominal
    budget -> counts after each stage, on ``reference_tokens`` visual tokens), for ``keep``.

    ``budget="equivalent"``: the table of the nominal budget nearest ``keep`` (a float is a fraction
    of ``reference_tokens``; ties go to the larger table), scaled by keep / nominal.
    ``budget="final"``: the table whose last count is nearest ``keep`` (tables ending at 0
    excluded), scaled so that the last stage keeps exactly ``keep``.
    An int ``keep`` gives token counts (at least 1), a float gives fractions (in [1e-6, 1]); no
    stage keeps more than the stage before.
    """
    keep = validate_budget(keep)
    check_budget_count(budget, method)
    as_tokens = keep if isinstance(keep, int) else keep * reference_tokens
    if budget == "equivalent":
        nominal = min(tables, key=lambda k: (abs(k - as_tokens), -k))
        factor = as_tokens / nominal
    else:
        ending = [k for k in tables if tables[k][-1] > 0]
        nominal = min(ending, key=lambda k: (abs(tables[k][-1] - as_tokens), -k))
        factor = as_tokens / tables[nominal][-1]
    raw = [x * factor for x in tables[nominal]]
    if isinstance(keep, int):
        out = [max(1, int(round(x))) for x in raw]
    else:
        out = [min(1.0, max(1e-6, x / reference_tokens)) for x in raw]
    if budget == "final":
        out[-1] = keep
    for i in range(1, len(out)):  # never grow from stage to stage
        out[i] = min(out[i], out[i - 1])
    return tuple(out)


def tokens_for(budget: Budget, original: int) -> int:
    """Tokens kept for a segment of ``original`` visual tokens.

    An int budget above the segment's size keeps the segment whole; a fraction rounds to the
    nearest token and keeps at least one.
    """
    if isinstance(budget, int):
        return min(budget, original)
    return max(1, min(original, int(round(budget * original)))) if original > 0 else 0


@dataclass
class Stage:
    """One pruning point.

    layer:   LLM decoder-layer boundary; the stage prunes the hidden states *entering* this
             layer (0 = before the first decoder layer, i.e. before the LLM).
    scorer:  a :class:`vtoken.scorers.base.Scorer` instance (or a registered scorer name).
    keep:    budget (see :data:`Budget`); for later stages it counts against each image's
             original tokens, so ``keep`` should shrink from stage to stage.
    mode:    ``"select"`` drops pruned tokens; ``"merge"`` averages each pruned token into its
             most similar kept token (or where the scorer says) before dropping it.
    options: extra per-stage options recorded in stats.
    """

    layer: int
    scorer: Any
    keep: Budget
    mode: str = "select"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral) or self.layer < 0:
            raise PruningConfigError(f"Stage.layer must be an int >= 0 (0 = before the LLM); got {self.layer!r}")
        self.layer = int(self.layer)
        self.keep = validate_budget(self.keep, what=f"keep of the stage at layer {self.layer}")
        if self.mode not in ("select", "merge"):
            raise PruningConfigError(f"Stage.mode must be 'select' or 'merge'; got {self.mode!r}")
        if isinstance(self.scorer, str):
            from vtoken.methods import make_scorer

            self.scorer = make_scorer(self.scorer)
        elif isinstance(self.scorer, type) or not callable(getattr(self.scorer, "select", None)) \
                or not isinstance(getattr(self.scorer, "name", None), str):
            hint = f" (a class: pass an instance, {self.scorer.__name__}())" if isinstance(self.scorer, type) else ""
            raise PruningConfigError(
                f"Stage.scorer must be a registered scorer name (e.g. 'fastv') or a vtoken.scorers.base.Scorer "
                f"instance; got {type(self.scorer).__name__} {self.scorer!r}{hint}"
            )


@dataclass
class DecodeStage:
    """One decode-time pruning point (a plan may hold these after its prefill :class:`Stage` s):
    during ``generate`` on the dynamic KV cache, before decode
    step ``step`` (0 = right after the prefill, before the first generated token's forward), the
    scorer ranks each chosen layer's VISUAL KV entries and the lowest are removed from the cache
    (``mode="evict"``), or first averaged into the kept entries (``mode="merge"``, the scorer's
    merge rule), or kept in ``bits``-bit precision instead (``mode="quantize"``: mixed-precision KV,
    ZipVL's; dequantised when read). The prefill itself is the plain model's.

    scorer:  a decode scorer (:class:`vtoken.scorers.decode.DecodeScorer`) or its registered name.
    keep:    budget (see :data:`Budget`) of each image's ORIGINAL visual tokens kept in every
             chosen layer; a later stage's ``keep`` should be smaller.
    step:    decode step before which the stage runs (int >= 0); stages of a plan have increasing
             steps.
    layers:  decoder layers whose cache it prunes (None: all).
    mode:    ``"evict"``, ``"merge"`` or ``"quantize"``.
    bits:    bit width of the low-precision entries in ``"quantize"`` mode (2, 4 or 8).
    readmit: ``"evict"`` mode only, with a scorer that scores entries from the layer's last query
             (``reads_query``, e.g. ``"lazyllm"``): the evicted entries are stashed off the live
             cache, and at this layer's next stage the candidates are the kept AND the stashed
             entries, so an entry evicted earlier can come back (LazyLLM's revival), re-inserted
             at its original slot order.
    """

    scorer: Any
    keep: Budget
    step: int = 0
    layers: Any = None
    mode: str = "evict"
    bits: int = 2
    options: dict = field(default_factory=dict)
    readmit: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.readmit, bool):
            raise PruningConfigError(f"DecodeStage.readmit must be True or False; got {self.readmit!r}")
        if self.bits not in (2, 4, 8) or isinstance(self.bits, bool):
            raise PruningConfigError(f"DecodeStage.bits must be 2, 4 or 8; got {self.bits!r}")
        if isinstance(self.step, bool) or not isinstance(self.step, numbers.Integral) or self.step < 0:
            raise PruningConfigError(f"DecodeStage.step must be an int >= 0 (0 = right after the prefill); got {self.step!r}")
        self.step = int(self.step)
        self.keep = validate_budget(self.keep, what=f"keep of the decode stage at step {self.step}")
        if self.mode not in ("evict", "merge", "quantize"):
            raise PruningConfigError(f"DecodeStage.mode must be 'evict', 'merge' or 'quantize'; got {self.mode!r}")
        if self.layers is not None:
            layers = tuple(self.layers) if isinstance(self.layers, (list, tuple, range)) else None
            if not layers or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0 for x in layers):
                raise PruningConfigError(f"DecodeStage.layers must be None (all) or a non-empty list of layer indices; "
                                         f"got {self.layers!r}")
            self.layers = tuple(sorted(set(int(x) for x in layers)))
        if isinstance(self.scorer, str):
            from vtoken.methods import make_scorer

            self.scorer = make_scorer(self.scorer)
        if not callable(getattr(self.scorer, "accumulate", None)) or not callable(getattr(self.scorer, "select", None)):
            raise PruningConfigError(
                f"DecodeStage.scorer must be a decode scorer (vtoken.scorers.decode.DecodeScorer, e.g. 'a2sf'); "
                f"got {type(self.scorer).__name__} {self.scorer!r}")
        if self.mode == "merge" and not getattr(self.scorer, "merges", False):
            raise PruningConfigError(f"decode scorer {self.scorer.name!r} has no merge rule; use mode='evict'")
        if self.readmit and self.mode != "evict":
            raise PruningConfigError(f"DecodeStage.readmit re-admits evicted entries and needs mode='evict'; "
                                     f"got mode={self.mode!r}")
        if self.readmit and not getattr(self.scorer, "reads_query", False):
            raise PruningConfigError(
                f"DecodeStage.readmit needs a scorer that can score stashed entries from the layer's last query "
                f"(e.g. 'lazyllm'); decode scorer {self.scorer.name!r} ranks by accumulated attention rows only")

    @property
    def layer(self) -> str:
        """Where it acts, for reprs and stats: ``"decode@<step>"``."""
        return f"decode@{self.step}"


def is_decode_plan(plan) -> bool:
    """Whether ``plan`` (a list of stages) holds decode-time stages."""
    return any(isinstance(st, DecodeStage) for st in plan)


def validate_plan(plan: list, num_layers: int) -> list:
    """Check an ordered plan against a model with ``num_layers`` decoder layers."""
    if not isinstance(plan, (list, tuple)) or not plan:
        raise PruningConfigError(f"a plan is a non-empty list of vtoken.Stage; got {plan!r}")
    if is_decode_plan(plan):  # prefill stages (if any) first, then the decode-time ones
        prefill = [st for st in plan if not isinstance(st, DecodeStage)]
        decode = _validate_decode_plan([st for st in plan if isinstance(st, DecodeStage)], num_layers)
        return (validate_plan(prefill, num_layers) if prefill else []) + decode
    for st in plan:
        if not isinstance(st, Stage):
            raise PruningConfigError(f"every plan entry must be a vtoken.Stage; got {type(st).__name__}")
        if st.layer >= num_layers:
            raise PruningConfigError(
                f"stage layer {st.layer} is outside the model's {num_layers} decoder layers (valid: 0..{num_layers - 1})"
            )
        if getattr(st.scorer, "pre_llm_only", False) and st.layer != 0:
            raise PruningConfigError(f"scorer {st.scorer.name!r} uses pre-LLM signals and only runs at layer 0")
    layers = [st.layer for st in plan]
    if layers != sorted(layers) or len(set(layers)) != len(layers):
        raise PruningConfigError(f"stage layers must be strictly increasing; got {layers}")
    return list(plan)


def split_plan(plan: list) -> tuple:
    """(prefill stages, decode-time stages) of a plan."""
    return [st for st in plan if not isinstance(st, DecodeStage)], [st for st in plan if isinstance(st, DecodeStage)]


def _validate_decode_plan(plan: list, num_layers: int) -> list:
    steps = [st.step for st in plan]
    if steps != sorted(steps) or len(set(steps)) != len(steps):
        raise PruningConfigError(f"decode stage steps must be strictly increasing; got {steps}")
    for i, st in enumerate(plan):
        if st.layers is not None and st.layers[-1] >= num_layers:
            raise PruningConfigError(
                f"decode stage layers {list(st.layers)} reach outside the model's {num_layers} decoder layers")
        mine = set(range(num_layers) if st.layers is None else st.layers)
        if st.mode == "quantize" and any(mine & set(range(num_layers) if s.layers is None else s.layers)
                                         for s in plan[i + 1:]):
            raise PruningConfigError("a decode stage in 'quantize' mode must be the last stage of its layers")
    return list(plan)


def equivalent_tokens(stage_layers: list, stage_counts: list, original: float, num_layers: int) -> float:
    """Layer-averaged visual tokens: each layer counts the visual tokens it processes.

    e.g. SparseVLM's (2*576 + 4*300 + 10*200 + 16*110) / 32 for stages at 2, 6, 16.
    """
    total, current, prev = 0.0, float(original), 0
    for layer, count in zip(stage_layers, stage_counts):
        total += current * (layer - prev)
        current, prev = float(count), layer
    total += current * (num_layers - prev)
    return total / num_layers
