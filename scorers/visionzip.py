"""VisionZip: dominant tokens by vision-encoder [CLS] attention plus contextual tokens merged by key
similarity, before the LLM; followed by its method preset (the plan builder registered with
:func:`vtoken.methods.register_method`).
"""

from __future__ import annotations

import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.attention_base import MODIFIERS, AttentionScorer
from vtoken.scorers.base import Selection, topk_selection
from vtoken.signals import SegmentSignals


@register_scorer
class VisionZipScorer(AttentionScorer):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
    Models", CVPR 2025, arXiv:2412.04467).

    Before the LLM: *dominant* tokens = the top tokens by vision-encoder [CLS] attention
    (penultimate layer, heads summed), and *contextual* tokens: the remaining tokens (in order)
    are split into uniformly strided targets and the rest, and every non-target token is merged
    into the target whose key (``vision_keys``, the encoder's key states, L2-normalised) is most
    similar. 64 tokens = 54 dominant + 10 contextual; in general contextual =
    round(budget * ``contextual_ratio``) with ``contextual_ratio`` = 10/64 (192 -> 162 + 30,
    128 -> 108 + 20), and at least one dominant token.

    The contextual tokens are kept slots (the strided targets) whose hidden state becomes the
    merge of their group: ``Selection.merge_into`` maps every merged token to its target, so the
    stage must run in ``mode="merge"`` (the preset does).

    Deviation: VisionZip sets a contextual token to target + mean(assigned tokens); vtoken's
    merge mode averages the target with its assigned tokens (a weighted mean), which keeps the
    contextual token at the scale of the other tokens.

    Signals: ``vision_attn`` (S, n), ``vision_keys`` (S, n, Dv) -> Selection with merge_into.
    """

    name = "visionzip"
    needs = frozenset({"vision_attn", "vision_keys"})
    pre_llm_only = True
    text_guided = False

    def __init__(self, contextual_ratio: float = 10.0 / 64.0, **modifiers):
        super().__init__(**modifiers)
        if not 0.0 <= contextual_ratio < 1.0:
            raise ValueError(f"contextual_ratio must lie in [0, 1); got {contextual_ratio}")
        self.contextual_ratio = float(contextual_ratio)

    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:
        return sig.vision_attn.float()

    def split(self, budget: int) -> tuple:
        """(dominant, contextual) token counts for a budget."""
        if budget <= 1:
            return budget, 0
        contextual = min(budget - 1, int(round(budget * self.contextual_ratio)))
        return budget - contextual, contextual

    def select(self, sig: SegmentSignals) -> Selection:
        """Vectorised over segments (no host sync, no per-segment loop): the dominant top-k, then
        per segment the remaining candidates' ranks ``r`` (in slot order) become targets where
        ``r % step == 0`` and ``r // step < contextual`` (``step = max(1, remaining // contextual)``:
        the uniformly strided targets), and every other remaining token merges into the target
        with the most similar key (ties: the lowest slot)."""
        scores = self.score(sig)
        S, n = sig.mask.shape
        b = sig.budget.to(torch.float32 if sig.budget.device.type == "mps" else torch.float64)
        contextual = torch.minimum(b - 1, torch.round(b * self.contextual_ratio))
        contextual = torch.where(b <= 1, torch.zeros_like(b), contextual).long()  # = split(budget)[1]
        dominant = topk_selection(scores, sig.mask, sig.budget - contextual)  # masked scores computed once
        keep = dominant.keep
        rest = sig.mask & ~keep
        rank = rest.long().cumsum(1) - 1
        step = (rest.sum(1) // contextual.clamp(min=1)).clamp(min=1).unsqueeze(1)
        target = rest & (rank % step == 0) & (rank // step < contextual.unsqueeze(1))
        others = rest & ~target & target.any(1, keepdim=True)  # no target (contextual 0): plain drop
        nearest = F.masked_max_similarity(F.unit_rows(sig.vision_keys), target)[1]
        merge_into = torch.where(others, nearest, -1)
        return Selection(keep=keep | target, scores=dominant.scores, merge_into=merge_into)


@register_method(name="visionzip", family="attention", paper="Yang et al., CVPR 2025 (arXiv:2412.04467)",
                 released_code="dvlab-research/VisionZip@3151f6d (kept set, assignment)",
                 stages="layer 0 (before the LLM), merge", needs_attention=False, text_guided=False,
                 options=("dominant", "contextual", "contextual_ratio") + MODIFIERS)
def visionzip_plan(keep, dominant=None, contextual=None, contextual_ratio: float = 10.0 / 64.0, **modifiers):
    """VisionZip preset: one merge stage before the LLM; ``dominant=`` and ``contextual=``
    (e.g. 54 and 10) fix the split and the budget."""
    if (dominant is None) != (contextual is None):
        raise PruningConfigError("visionzip: give both dominant= and contextual= (e.g. 54 and 10), or neither")
    if dominant is not None:
        if int(dominant) < 1 or int(contextual) < 0:
            raise PruningConfigError(f"visionzip: need dominant >= 1 and contextual >= 0; got {dominant}, {contextual}")
        keep = int(dominant) + int(contextual)
        contextual_ratio = int(contextual) / keep
    scorer = VisionZipScorer(contextual_ratio=contextual_ratio, **modifiers)
    return [Stage(layer=0, scorer=scorer, keep=validate_budget(keep), mode="merge")]


__all__ = ["VisionZipScorer", "visionzip_plan"]
