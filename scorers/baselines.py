"""Baselines every retained-accuracy table needs: ``random``, ``uniform`` and ``none``."""

from __future__ import annotations

import math

import torch

from vtoken.scorers.base import Scorer, Selection, masked_scores, topk_mask
from vtoken.signals import SegmentSignals


class RandomScorer(Scorer):
    """Keep a seeded random subset of each image's tokens.

    The random draw depends only on (seed, the segment's number within its sample, its original
    size), never on the batch composition, so a sample prunes the same way alone or in a batch,
    and successive stages agree (scores are indexed by the token's original index).
    """

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def score(self, sig: SegmentSignals) -> torch.Tensor:
        scores = torch.zeros(sig.mask.shape, dtype=torch.float32)
        for s in range(sig.num_segments):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(sig.ordinal[s]) * 7919 + int(sig.original[s]))
            table = torch.rand(int(sig.original[s]), generator=g)
            idx = sig.index[s].clamp(min=0).cpu()
            scores[s] = table[idx]
        return scores.to(sig.mask.device)


def grid_points(k: int, h: int, w: int) -> list:
    """Row-major indices of ``k`` cells spread evenly over an h x w grid (k <= h*w).

    Cells are the centres of a gh x gw lattice with gh/gw close to h/w; the first k lattice
    points in a stride order that interleaves rows are used when the lattice has more than k.
    """
    k = min(k, h * w)
    gh = max(1, min(h, round(math.sqrt(k * h / w))))
    gw = max(1, min(w, math.ceil(k / gh)))
    gh = min(h, math.ceil(k / gw))
    rows = [min(h - 1, int((i + 0.5) * h / gh)) for i in range(gh)]
    cols = [min(w - 1, int((j + 0.5) * w / gw)) for j in range(gw)]
    lattice = [r * w + c for r in rows for c in cols]
    if len(lattice) == k:
        return lattice
    # more lattice points than needed: drop evenly spaced ones so the rest stays spread out
    pick = [lattice[int(i * len(lattice) / k)] for i in range(k)]
    return pick


class UniformScorer(Scorer):
    """Keep a spatially even sub-grid of each image (falls back to evenly spaced positions
    along the candidate list when the grid is unknown or the image was already pruned)."""

    name = "uniform"

    def select(self, sig: SegmentSignals) -> Selection:
        keep = torch.zeros_like(sig.mask)
        for s in range(sig.num_segments):
            k = int(sig.budget[s])
            slots = torch.nonzero(sig.mask[s]).flatten()
            n, orig = slots.numel(), int(sig.original[s])
            grid = sig.grid[s] if sig.grid is not None else None
            if grid is not None and n == orig and grid[0] * grid[1] * grid[2] == orig:
                t, h, w = grid
                per = [k // t + (1 if f < k % t else 0) for f in range(t)]
                chosen = [f * h * w + p for f in range(t) for p in grid_points(per[f], h, w)]
                index_to_slot = {int(sig.index[s, j]): j for j in slots.tolist()}
                picks = [index_to_slot[i] for i in chosen]
            else:
                picks = [int(slots[int((i + 0.5) * n / k)]) for i in range(k)] if k > 0 else []
            keep[s, picks] = True
        return Selection(keep=keep, scores=masked_scores(keep.float(), sig.mask))


class KeepAllScorer(Scorer):
    """``none``: keeps every visual token (the unpruned upper bound through the same code path)."""

    name = "none"

    def select(self, sig: SegmentSignals) -> Selection:
        return Selection(keep=sig.mask.clone(), scores=masked_scores(torch.ones_like(sig.mask, dtype=torch.float32), sig.mask))


__all__ = ["RandomScorer", "UniformScorer", "KeepAllScorer", "grid_points", "topk_mask"]
