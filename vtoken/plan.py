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


def validate_plan(plan: list, num_layers: int) -> list:
    """Check an ordered plan against a model with ``num_layers`` decoder layers."""
    if not isinstance(plan, (list, tuple)) or not plan:
        raise PruningConfigError(f"a plan is a non-empty list of vtoken.Stage; got {plan!r}")
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
