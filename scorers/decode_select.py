"""Which visual KV entries a decode-time stage evicts: one pure function shared by the dynamic
cache's runtime (:mod:`vtoken.hooks.decode_runtime`) and the static-buffer engine
(:mod:`vtoken.engine.static_stages`, through :class:`vtoken.hooks.decode_record.DecodePrefill`), so both evict exactly the same slots from the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    other slots), scores (B, L), budget (S,) long kept per segment -> (B, L) bool evicted."""
    return indexed_selection(scorer, selection_index(seg, budget.shape[0]), scores, budget)


@dataclass(frozen=True)
class SelectionIndex:
    """Where each segment's prunable slots lie in a (B, L0) layout (:func:`selection_index`),
    valid for that layout followed by any number of non-prunable columns: ``b``, ``j`` (N,) the
    row and column of each prunable slot, grouped by segment in slot order; ``segs``, ``rank`` (N,)
    its segment and place in it; ``idx_b``, ``idx_j`` (S, m) the slot of each segment's place
    (0 where the segment has fewer); ``mask`` (S, m) real places; ``counts`` (S,) slots per segment."""

    b: torch.Tensor
    j: torch.Tensor
    segs: torch.Tensor
    rank: torch.Tensor
    idx_b: torch.Tensor
    idx_j: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor


def selection_index(seg: torch.Tensor, S: int) -> Optional[SelectionIndex]:
    """The :class:`SelectionIndex` of seg (B, L0) (S segments; None: no prunable slot). Two host
    syncs (the slots' count and the largest segment); :func:`indexed_selection` then needs none."""
    B, L = seg.shape
    flat = seg.reshape(-1)
    ids = (flat >= 0).nonzero().squeeze(1)
    if ids.numel() == 0:
        return None
    segs = flat[ids]
    order = torch.argsort(segs, stable=True)
    ids, segs = ids[order], segs[order]
    counts = torch.bincount(segs, minlength=S)
    rank = torch.arange(ids.numel(), device=seg.device) - (counts.cumsum(0) - counts)[segs]
    idx = torch.full((S, int(counts.max())), -1, dtype=torch.long, device=seg.device)
    idx[segs, rank] = ids
    mask = idx >= 0
    idx = idx.clamp(min=0)
    return SelectionIndex(ids // L, ids % L, segs, rank, idx // L, idx % L, mask, counts)


def indexed_selection(scorer, index: Optional[SelectionIndex], scores: torch.Tensor,
                      budget: torch.Tensor) -> torch.Tensor:
    """:func:`segment_selection` from a :class:`SelectionIndex` of the first columns of scores
    (B, L): the same slots evicted, no host sync -> (B, L) bool evicted."""
    evicted = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if index is None:
        return evicted
    keep = scorer.select(scores[index.idx_b, index.idx_j], index.mask, torch.minimum(budget, index.counts))
    evicted[index.b, index.j] = ~keep[index.segs, index.rank]
    return evicted
