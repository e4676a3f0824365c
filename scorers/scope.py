"""SCOPE: greedy selection by saliency x set-coverage gain, before the LLM; followed by its method
preset (the plan builder registered with :func:`vtoken.methods.register_method`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.base import Scorer, Selection
from vtoken.scorers.diversity import _rank_scores
from vtoken.signals import SegmentSignals


def scope_greedy(features: torch.Tensor, saliency: torch.Tensor, mask: torch.Tensor, budget: torch.Tensor,
                 alpha: float = 1.0, combine: str = "multi") -> tuple:
    """SCOPE's greedy rule, batched over segments on the device (no host sync inside the loop).

    features (S, n, D), saliency (S, n) >= 0, mask (S, n) bool, budget (S,) long.
    Coverage of token i by a set K: c_i(K) = max(0, max_{k in K} cos(i, k)) (0 for the empty set).
    Step by step, every unchosen real token j gets its coverage gain
    g_j = sum_i max(0, cos(i, j) - c_i(K)) over the segment's real tokens i, combined with its
    saliency (``combine="multi"``: g_j * a_j ** alpha; ``"add"``: g_j + a_j ** alpha), and the
    largest wins (ties: the lower slot, as ``argmax`` breaks them).

    Returns (keep (S, n) bool with exactly ``min(budget, real slots)`` True per row, order (S, n)
    long: pick rank of each chosen slot, -1 elsewhere).
    """
    S, n = mask.shape
    dev = mask.device
    z = F.unit_rows(features).masked_fill(~mask.unsqueeze(-1), 0.0)
    sim = z @ z.transpose(1, 2)  # (S, n, n); padding rows / columns 0: they add no gain
    sal = saliency.float().nan_to_num(0.0).clamp(min=0.0) ** alpha
    keep = torch.zeros((S, n), dtype=torch.bool, device=dev)
    order = torch.full((S, n), -1, dtype=torch.long, device=dev)
    budget = torch.minimum(budget.to(dev).long(), mask.sum(dim=1))
    cover = torch.zeros((S, n), dtype=torch.float32, device=dev)  # c_i(K)
    steps = int(budget.max()) if S else 0
    for t in range(steps):
        active = budget > t  # (S,)
        gain = (sim - cover.unsqueeze(2)).clamp(min=0.0).mul(mask.unsqueeze(2)).sum(dim=1)  # (S, n) over i
        score = gain * sal if combine == "multi" else gain + sal
        pick = score.masked_fill(~mask | keep, float("-inf")).argmax(dim=1, keepdim=True)  # (S, 1)
        chosen = torch.zeros_like(keep).scatter_(1, pick, active.unsqueeze(1))
        keep |= chosen
        order = torch.where(chosen, t, order)
        row = sim.gather(1, pick.unsqueeze(-1).expand(-1, 1, n)).squeeze(1)  # cos(., pick) (S, n)
        cover = torch.where(active.unsqueeze(1), torch.maximum(cover, row), cover)
    return keep, order


@register_scorer
class SCOPEScorer(Scorer):
    """SCOPE (Deng et al., "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient
    Multimodel LLMs", NeurIPS 2025, arXiv:2510.24214). Released code read: github.com/kinredon/SCOPE
    at commit 6bf73069e0d61307051cfda8e25925bc7b7afdd9 (``scope/clip_encoder.py``: ``SCOPE`` and
    ``CLIPVisionTower_SCOPE.forward``).

    The released rule, before the LLM: the saliency a_j of a visual token is the vision encoder's
    [CLS] attention to it at the penultimate layer (heads summed); the set-coverage of the kept
    set K is sum_i max(0, max_{k in K} cos(i, k)) over all visual tokens i; tokens are picked one
    at a time, each maximising its coverage gain times a_j ** alpha (``ALPHA`` = 1, ``COMBINED`` =
    ``multi`` in the released code; ``combine="add"`` is its other branch), ties to the lower
    index (``argmax``), until the budget is reached (:func:`scope_greedy`). Text-agnostic.

    Deviations:

    - Features. The released code measures cosine similarity on the CLIP penultimate-layer patch
      features (before the projector); vtoken has no pre-projector feature signal and uses the
      projected embeddings that enter the LLM (``hidden`` at layer 0), the features DivPrune and
      CDPruner use.
    - Saliency source. ``vision_attn`` is the penultimate-layer [CLS] attention where the tower has
      a [CLS] (LLaVA family; heads averaged, the released sum over heads divided by H: the same
      picks with ``combine="multi"``, while ``"add"`` weighs saliency H ** -alpha times less than
      the released branch); for towers without one (Qwen-VL) the runtime provides the mean attention
      each token receives, pooled to LLM tokens. Video segments carry no encoder attention:
      the runtime refuses a budget that prunes them (``PruningConfigError``).
    - Budget. The released code splits the budget evenly over the crops of a LLaVA-NeXT image
      (``num_token / crops`` per crop, selection per crop); vtoken selects over the whole image
      segment with its budget.
    - Precision. Float32 throughout (the released code runs in the tower's dtype, fp16).

    Signals: ``vision_attn`` (S, n), ``hidden`` (S, n, D) -> Selection (exactly ``budget`` tokens
    per segment). Scores (heatmaps): earlier picks higher. Diagnostics: ``erank`` of the kept tokens.
    """

    name = "scope"
    needs = frozenset({"vision_attn", "hidden"})
    pre_llm_only = True
    text_guided: ClassVar[bool] = False
    COMBINE = ("multi", "add")

    def __init__(self, alpha: float = 1.0, combine: str = "multi"):
        if combine not in self.COMBINE:
            raise ValueError(f"combine must be one of {self.COMBINE}; got {combine!r}")
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0; got {alpha!r}")
        self.alpha = float(alpha)
        self.combine = combine

    def select(self, sig: SegmentSignals) -> Selection:
        keep, order = scope_greedy(sig.hidden, sig.vision_attn, sig.mask, sig.budget, self.alpha, self.combine)
        sig.diagnostics["erank"] = F.deferred_erank(sig.hidden, keep)
        return Selection(keep=keep, scores=_rank_scores(order, keep, sig.mask))


@register_method(name="scope", family="diversity", paper="Deng et al., NeurIPS 2025 (arXiv:2510.24214)",
                 stages="layer 0 (before the LLM)", needs_attention=False, text_guided=False,
                 options=("alpha", "combine", "mode"),
                 released_code="kinredon/SCOPE@6bf7306")
def scope_plan(keep, alpha: float = 1.0, combine: str = "multi", mode: str = "select"):
    """SCOPE preset: one stage before the LLM (see :class:`SCOPEScorer`)."""
    return [Stage(layer=0, scorer=SCOPEScorer(alpha=alpha, combine=combine), keep=validate_budget(keep), mode=mode)]


__all__ = ["SCOPEScorer", "scope_greedy", "scope_plan"]
