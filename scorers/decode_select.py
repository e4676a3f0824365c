"""Which visual KV entries a decode-time stage evicts: one pure function shared by the dynamic
cache's runtime (:mod:`vtoken.hooks.decode_runtime`) and the static-buffer engine
(:mod:`vtoken.engine.static_stages`, through :class:`vtoken.hooks.decode_record.DecodePrefill`), so both evict exactly the same slots from the same scores.
"""

from __future__ import annotations

from typing import Optional

import torch


def stage_eviction(scorer, segment: torch.Tensor, positions: torch.Tensor, scores: Optional[torch.Tensor],
                   budget: torch.Tensor) -> torch.Tensor:
    """The slots of a layer a stage evicts. segment (B, n) the image (segment id) of each prunable
    visual prompt token, -1 elsewhere; positions (B, L) the prompt index of each of the layer's L
    slots (>= n or -1: generated tokens, padding); scores (B, L) the scorer's accumulated scores
    over those slots (None: zeros); budget (S,) long kept per segment -> (B, L) bool evicted."""
    n = segment.shape[1]
    in_prompt = (positions >= 0) & (positions < n)
    seg = torch.where(in_prompt, segment.gather(1, positions.clamp(0, n - 1)), -1)
    if scores is None:
        scores = torch.zeros(positions.shape, device=positions.device)
    return segment_selection(scorer, seg, scores, budget)


def segment_selection(scorer, seg: torch.Tensor, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """The slots a decode scorer evicts: seg (B, L) segment of each prunable visual slot (-1
    other slots), scores (B, L), budget (S,) kept per segment -> (B, L) bool evicted."""
    B, L = seg.shape
    flat = seg.reshape(-1)
    ids = (flat >= 0).nonzero().squeeze(1)
    evicted = torch.zeros(B * L, dtype=torch.bool, device=seg.device)
    if ids.numel() == 0:
        return evicted.view(B, L)
    segs = flat[ids]
    order = torch.argsort(segs, stable=True)
    ids, segs = ids[order], segs[order]
    S = budget.shape[0]
    counts = torch.bincount(segs, minlength=S)
    rank = torch.arange(ids.numel(), device=seg.device) - (counts.cumsum(0) - counts)[segs]
    idx = torch.full((S, int(counts.max())), -1, dtype=torch.long, device=seg.device)
    idx[segs, rank] = ids
    mask = idx >= 0
    keep = scorer.select(scores.reshape(-1)[idx.clamp(min=0)], mask, torch.minimum(budget, counts))
    evicted[ids] = ~keep[segs, rank]
    return evicted.view(B, L)
