"""VisPruner: important tokens by vision-encoder [CLS] attention plus diverse tokens left after
removing near-duplicates from the rest, before the LLM; followed by its method preset (the plan
builder registered with :func:`vtoken.methods.register_method`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.base import Scorer, Selection, masked_scores
from vtoken.signals import SegmentSignals


def _round_count(R: int, diverse: int, step: int) -> int:
    """Rounds of duplicate removal from R residual tokens down to ``diverse``."""
    rounds = 0
    while diverse > 0:
        r = min(step, R - diverse, (R + 1) // 2)
        if r <= 0:
            return rounds
        R, rounds = R - r, rounds + 1
    return rounds


def vispruner_select(features: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor, budget: torch.Tensor,
                     important_ratio: float = 0.5, step: int = 8) -> torch.Tensor:
    """VisPruner's rule, batched over segments on the device (one host sync: the round count).

    features (S, n, D), attention (S, n), mask (S, n), budget (S,) -> keep (S, n) bool with
    exactly ``min(budget, real slots)`` True per row.

    Important: the ``int(budget * important_ratio)`` tokens of largest attention. The others,
    in decreasing attention, form the residual list (R tokens); while R exceeds the diverse
    budget, one round: r = min(step, R - diverse, ceil(R / 2)); the residual's even positions (a)
    are matched to its odd positions (b) by cosine similarity, the r tokens of a with the largest
    best match are removed, and the residual becomes the rest of a in decreasing best-match order followed by
    b in its order. Ties (sorts) break towards the earlier position.
    """
    S, n = mask.shape
    dev = mask.device
    count = mask.sum(dim=1)
    budget = torch.minimum(budget.to(dev).long(), count)  # one host sync below: the round count
    exact = torch.float32 if dev.type == "mps" else torch.float64  # int(T * r) as Python computes it
    n_imp = torch.floor(budget.to(exact) * important_ratio).long()
    diverse = budget - n_imp
    ranked = torch.sort(masked_scores(attention, mask), dim=1, descending=True, stable=True).indices  # (S, n)
    pos = torch.arange(n, device=dev).expand(S, n)
    keep = torch.zeros((S, n), dtype=torch.bool, device=dev)
    keep.scatter_(1, ranked, pos < n_imp.unsqueeze(1))
    # the residual list: ranked[n_imp:count] shifted to the front
    shift = (pos + n_imp.unsqueeze(1)).clamp(max=n - 1)
    res = ranked.gather(1, shift)
    R = torch.where(diverse > 0, count - n_imp, diverse)  # segments without diverse tokens: no rounds
    rounds = max((_round_count(r0, d, step) for r0, d in torch.stack([R, diverse], dim=1).tolist()), default=0)
    if rounds:
        z = F.unit_rows(features)
        sim = z @ z.transpose(1, 2)  # (S, n, n) over slots
        big = n + 1
        for _ in range(rounds):
            r = torch.minimum(torch.full_like(R, step), R - diverse).clamp(min=0)  # (S,)
            r = torch.minimum(r, (R + 1) // 2)  # at most the whole first half
            live = pos < R.unsqueeze(1)
            even = live & (pos % 2 == 0)
            odd = live & (pos % 2 == 1)
            # best match of every slot among the slots at odd positions, then read at even positions
            odd_slot = torch.zeros((S, n + 1), dtype=torch.bool, device=dev)
            odd_slot = odd_slot.scatter_(1, torch.where(odd, res, n), True)[:, :n]
            best = sim.masked_fill(~odd_slot.unsqueeze(1), float("-inf")).amax(dim=2)  # (S, n) per slot
            best = best.gather(1, res).masked_fill(~even, float("-inf"))  # (S, n) per position
            arank = torch.empty_like(pos)  # rank of each even position by decreasing best match
            arank.scatter_(1, torch.sort(best, dim=1, descending=True, stable=True).indices, pos)
            kept_a = even & (arank >= r.unsqueeze(1))
            n_kept_a = (R + 1) // 2 - r
            key = torch.where(kept_a, arank - r.unsqueeze(1), torch.full_like(pos, big))
            key = torch.where(odd, n_kept_a.unsqueeze(1) + pos // 2, key)
            new = res.gather(1, torch.sort(key, dim=1, stable=True).indices)
            act = (r > 0).unsqueeze(1)
            res = torch.where(act, new, res)
            R = R - r
    div = torch.zeros((S, n + 1), dtype=torch.bool, device=dev)  # column n: positions past the diverse count
    div.scatter_(1, torch.where(pos < diverse.unsqueeze(1), res, n), True)
    return (keep | div[:, :n]) & mask


@register_scorer
class VisPrunerScorer(Scorer):
    """VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for
    Effective Token Pruning in VLMs", ICCV 2025, arXiv:2412.01818, whose first version was
    FasterVLM). Released code read:
    github.com/Theia-4869/VisPruner at commit aefa01adc7c7ce6334e880c88225e90cede760d1
    (``llava/model/llava_arch.py``: ``encode_images``).

    The released rule, before the LLM (:func:`vispruner_select`): T_imp = int(T * r) important
    tokens by [CLS] attention (penultimate encoder layer, heads averaged; r = ``important_ratio``
    = 0.5, the released default), then T - T_imp diverse tokens from the rest by iterative
    duplicate removal: the rest in decreasing attention, split into alternating halves, the up
    to 8 (``step``) tokens of the first half most similar (cosine) to some token of the second
    half removed per round, until T - T_imp remain.

    Deviations:

    - Features. The released code measures similarity on the CLIP penultimate patch features
      (before the projector); vtoken uses the projected embeddings entering the LLM (``hidden``
      at layer 0): there is no pre-projector feature signal.
    - Attention source. ``vision_attn``: [CLS] attention where the tower has one; for towers
      without (Qwen-VL) the mean attention each token receives, pooled to LLM tokens (the
      released SigLIP variant also uses mean attention received). Video segments carry no
      encoder attention: the runtime refuses a budget that prunes them (``PruningConfigError``).
    - Ties. The released sorts are unstable; vtoken breaks ties towards the earlier position.
    - Where the released indexing fails, vtoken continues the rule: with an odd residual length
      (halves of unequal size) the first half (even positions) is the larger one; when a round
      would remove more first-half tokens than there are (r > R / 2: small diverse budgets), it
      removes the whole first half (r = ceil(R / 2)) and goes on.
    - Budget. The released code prunes each LLaVA-NeXT crop with the per-crop budget; vtoken
      prunes the whole image segment with its budget.

    Signals: ``vision_attn`` (S, n), ``hidden`` (S, n, D) -> Selection. Scores (heatmaps): the
    attention. Diagnostics: ``erank`` of the kept tokens.
    """

    name = "vispruner"
    needs = frozenset({"vision_attn", "hidden"})
    pre_llm_only = True
    text_guided: ClassVar[bool] = False

    def __init__(self, important_ratio: float = 0.5, step: int = 8):
        if not 0.0 <= important_ratio <= 1.0:
            raise ValueError(f"important_ratio must lie in [0, 1]; got {important_ratio!r}")
        if int(step) < 1:
            raise ValueError(f"step must be >= 1; got {step!r}")
        self.important_ratio = float(important_ratio)
        self.step = int(step)

    def select(self, sig: SegmentSignals) -> Selection:
        keep = vispruner_select(sig.hidden, sig.vision_attn, sig.mask, sig.budget, self.important_ratio, self.step)
        sig.diagnostics["erank"] = F.deferred_erank(sig.hidden, keep)
        return Selection(keep=keep, scores=masked_scores(sig.vision_attn, sig.mask))


@register_method(name="vispruner", family="diversity", paper="Zhang et al., ICCV 2025 (arXiv:2412.01818)",
                 stages="layer 0 (before the LLM)", needs_attention=False, text_guided=False,
                 options=("important_ratio", "step", "mode"),
                 released_code="Theia-4869/VisPruner@aefa01a")
def vispruner_plan(keep, important_ratio: float = 0.5, step: int = 8, mode: str = "select"):
    """VisPruner preset: one stage before the LLM (see :class:`VisPrunerScorer`)."""
    scorer = VisPrunerScorer(important_ratio=important_ratio, step=step)
    return [Stage(layer=0, scorer=scorer, keep=validate_budget(keep), mode=mode)]


__all__ = ["VisPrunerScorer", "vispruner_select", "vispruner_plan"]
