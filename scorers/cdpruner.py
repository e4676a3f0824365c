"""CDPruner: MAP selection of a conditional determinantal point process whose kernel couples
instruction relevance with pairwise similarity; followed by its method preset (the plan builder
registered with :func:`vtoken.methods.register_method`).
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


def instruction_relevance(z: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                          negate: bool = True) -> torch.Tensor:
    """CDPruner's relevance of each visual token to the instruction, min-max normalised per segment.

    z (S, n, D) unit visual features, t (S, T, D) unit text features, rows (S, T) bool (the
    instruction's rows), mask (S, n) -> (S, n) float32: r = mean over rows of cos (negated when
    ``negate``, as released), then (r - min + 1e-6) / (max - min) over the segment's real tokens.
    A segment with no instruction rows, or whose relevance is constant, gets 1 everywhere.
    """
    w = rows.float()
    cnt = w.sum(dim=1, keepdim=True)  # (S, 1)
    rel = (z @ t.transpose(1, 2) * w.unsqueeze(1)).sum(dim=2) / cnt.clamp(min=1.0)  # (S, n)
    if negate:
        rel = -rel
    lo = rel.masked_fill(~mask, float("inf")).min(dim=1, keepdim=True).values
    hi = rel.masked_fill(~mask, float("-inf")).max(dim=1, keepdim=True).values
    span = hi - lo
    ok = (cnt > 0) & (span > 0)
    out = (rel - lo + 1e-6) / torch.where(ok, span, torch.ones_like(span))
    return torch.where(ok, out, torch.ones_like(out)).masked_fill(~mask, 0.0)


def dpp_greedy_map(kernel: torch.Tensor, mask: torch.Tensor, budget: torch.Tensor) -> tuple:
    """Greedy MAP inference of a DPP (the fast incremental-Cholesky rule of Chen et al., NeurIPS
    2018, as CDPruner runs it), batched over segments on the device (no host sync in the loop).

    kernel (S, n, n) PSD, mask (S, n), budget (S,) -> (keep (S, n) bool, order (S, n) long).
    Each step picks the token of largest remaining marginal gain d_j^2 (ties: the lower slot),
    then with e = (L[j, :] - c_j . C) / sqrt(d_j^2) updates C <- [C; e] and d^2 <- d^2 - e^2.
    Guard: where the kernel's rank is exhausted (d_j^2 <= 1e-12), the division uses 1e-12 instead
    of d_j^2, and non-finite d^2 ranks lowest among the available tokens (the released code would
    take the square root of a non-positive number and pick NaN tokens, repeats included); the
    picks stay distinct real tokens, exactly the budget.
    """
    S, n = mask.shape
    dev = mask.device
    budget = torch.minimum(budget.to(dev).long(), mask.sum(dim=1))
    steps = int(budget.max()) if S else 0
    keep = torch.zeros((S, n), dtype=torch.bool, device=dev)
    order = torch.full((S, n), -1, dtype=torch.long, device=dev)
    cis = torch.zeros((max(steps, 1), S, n), dtype=torch.float32, device=dev)
    d2 = torch.diagonal(kernel, dim1=1, dim2=2).float().masked_fill(~mask, float("-inf")).clone()
    ar = torch.arange(S, device=dev)
    for i in range(steps):
        active = budget > i
        # an available token always beats a taken or padding one, even once d^2 has lost all
        # precision (rank exhausted: -inf or NaN become the lowest finite value)
        avail = mask & ~keep
        low = torch.finfo(torch.float32).min
        j = torch.where(avail, d2.nan_to_num(nan=low, posinf=-low, neginf=low), float("-inf")).argmax(dim=1)
        chosen = torch.zeros_like(keep)
        chosen[ar, j] = active
        num = kernel[ar, j].float() - torch.einsum("ts,tsn->sn", cis[:i, ar, j], cis[:i])
        e = num / d2[ar, j].clamp(min=1e-12).sqrt().unsqueeze(1)
        e = torch.where(active.unsqueeze(1) & mask, e, torch.zeros_like(e))
        cis[i] = e
        d2 = d2 - e.square()
        keep |= chosen
        order = torch.where(chosen, i, order)
    return keep, order


@register_scorer
class CDPrunerScorer(Scorer):
    """CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity
    for Token Pruning in MLLMs", NeurIPS 2025, arXiv:2506.10967). Released code read:
    github.com/Theia-4869/CDPruner at commit 9541616c40fcd5625de1cdb8ea6c33c129eb7864
    (``llava/model/llava_arch.py``: ``encode_images``; ``clip_encoder.py``).

    The released rule, before the LLM:

    1. Similarity S_ij = cosine similarity of the projected visual features (the projector's
       output: vtoken's ``hidden`` at layer 0, exactly the released input).
    2. Relevance r_i = mean over the instruction's embeddings m of -cos(v_i, m) (the released
       code negates it), min-max normalised: (r - min + 1e-6) / (max - min).
    3. Kernel L_ij = r_i S_ij r_j (the released default, no theta reweighting); greedy MAP
       inference of the DPP picks the budget (:func:`dpp_greedy_map`), ties to the lower index.

    Deviations:

    - Relevance features. The released code compares CLIP image embeddings (post-layernorm and
      visual projection of the penultimate patch features) with CLIP text embeddings of the
      instruction (one pooled embedding per 77-token chunk); HF VLMs carry no CLIP text tower, so
      vtoken compares the projected visual features with the instruction's token embeddings in
      the LLM's input space (``text_hidden`` at layer 0: the text rows after the image,
      ``text_after``, i.e. the prompt that follows it) and averages over those tokens.
      ``negate=False`` drops the released sign flip (which suits CLIP's penultimate features).
    - Per segment. The released code normalises relevance over its whole batch of crops and
      selects per crop (LLaVA-NeXT: budget per crop); vtoken normalises and selects per image
      segment. A segment with no text after it (or constant relevance) gets r = 1 (plain DPP).
    - Numerical guard of :func:`dpp_greedy_map` where the kernel's rank is exhausted.

    Signals: ``hidden`` (S, n, D), ``text_hidden`` (S, T, D), ``text_after`` (S, T) ->
    Selection. Scores (heatmaps): earlier picks higher. Diagnostics: ``erank`` of the kept tokens.
    """

    name = "cdpruner"
    needs = frozenset({"hidden", "text_hidden", "text_after"})
    text_guided: ClassVar[bool] = True

    def __init__(self, negate: bool = True):
        self.negate = bool(negate)

    def select(self, sig: SegmentSignals) -> Selection:
        z = F.unit_rows(sig.hidden).masked_fill(~sig.mask.unsqueeze(-1), 0.0)
        S, n = sig.mask.shape
        if sig.text_hidden is not None and sig.text_hidden.shape[1] and sig.text_after is not None:
            rows = sig.text_after.to(z.device)
            if sig.text_mask is not None:
                rows = rows & sig.text_mask.to(z.device)
            rel = instruction_relevance(z, F.unit_rows(sig.text_hidden), rows, sig.mask, self.negate)
        else:
            rel = sig.mask.float()
        kernel = rel.unsqueeze(2) * (z @ z.transpose(1, 2)) * rel.unsqueeze(1)
        keep, order = dpp_greedy_map(kernel, sig.mask, sig.budget)
        sig.diagnostics["erank"] = F.deferred_erank(sig.hidden, keep)
        return Selection(keep=keep, scores=_rank_scores(order, keep, sig.mask))


@register_method(name="cdpruner", family="diversity", paper="Zhang et al., NeurIPS 2025 (arXiv:2506.10967)",
                 stages="layer 0 (before the LLM)", needs_attention=False, text_guided=True,
                 options=("layer", "negate", "mode"),
                 released_code="Theia-4869/CDPruner@9541616")
def cdpruner_plan(keep, layer: int = 0, negate: bool = True, mode: str = "select"):
    """CDPruner preset: one stage at ``layer`` (default before the LLM)."""
    return [Stage(layer=layer, scorer=CDPrunerScorer(negate=negate), keep=validate_budget(keep), mode=mode)]


__all__ = ["CDPrunerScorer", "dpp_greedy_map", "instruction_relevance", "cdpruner_plan"]
