"""Baselines every retained-accuracy table needs: ``random``, ``uniform`` and ``none``, each
scorer followed by its method preset (registered with :func:`vtoken.methods.register_method`)."""

from __future__ import annotations

import math

import torch

from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers.base import (Scorer, Selection, full_grid, masked_scores, position_slots, segment_counts,
                                 to_slots, topk_mask)
from vtoken.signals import SegmentSignals


@register_scorer
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
            table = torch.rand(int(sig.original[s]), generator=g, dtype=torch.float32)
            idx = sig.index[s].clamp(min=0).cpu()
            scores[s] = table[idx]
        return scores.to(sig.mask.device)


@register_method(name="random", family="baseline", stages="layer 0", options=("layer", "seed"))
def random_plan(keep, layer: int = 0, seed: int = 0):
    """Random baseline preset: one stage at ``layer`` (default before the LLM)."""
    return [Stage(layer=layer, scorer=RandomScorer(seed=seed), keep=validate_budget(keep))]


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


@register_scorer
class UniformScorer(Scorer):
    """Keep a spatially even sub-grid of each image (falls back to evenly spaced positions
    along the candidate list when the grid is unknown or the image was already pruned)."""

    name = "uniform"

    def select(self, sig: SegmentSignals) -> Selection:
        counts, budgets, original = segment_counts(sig)
        grids = [full_grid(sig, s, c, original[s]) for s, c in enumerate(counts)]
        keep = uniform_keep(sig, counts, budgets, grids, range(sig.num_segments))
        return Selection(keep=keep, scores=masked_scores(keep.float(), sig.mask))


def uniform_keep(sig: SegmentSignals, counts: list, budgets: list, grids: list, rows) -> torch.Tensor:
    """The uniform rule on the segments ``rows`` (host lists from :func:`segment_counts`; grids
    from :func:`full_grid`): (S, n) bool, an even sub-grid of each frame (the first ``k % t``
    frames one more) where the grid is complete, else evenly spaced real slots. No host sync."""
    S, n = sig.mask.shape
    rows, picks = list(rows), []
    for s in rows:
        k, c, grid = budgets[s], counts[s], grids[s]
        if grid is not None:
            t, h, w = grid
            per = [k // t + (1 if f < k % t else 0) for f in range(t)]
            picks += [(s, f * h * w + p) for f in range(t) for p in grid_points(per[f], h, w)]
        elif k > 0:
            picks += [(s, int((i + 0.5) * c / k)) for i in range(k)]
    slot, real = position_slots(sig, counts, [g is not None for g in grids])
    chosen = torch.zeros((S, n + 1), dtype=torch.bool, device=sig.mask.device)
    if picks:
        at = torch.tensor(picks, dtype=torch.long, device=sig.mask.device)
        chosen[at[:, 0], at[:, 1]] = True
    return to_slots(chosen[:, :n], slot, real)


@register_method(name="uniform", family="baseline", stages="layer 0", options=("layer",))
def uniform_plan(keep, layer: int = 0):
    """Uniform-grid baseline preset: one stage at ``layer`` (default before the LLM)."""
    return [Stage(layer=layer, scorer=UniformScorer(), keep=validate_budget(keep))]


@register_scorer
class KeepAllScorer(Scorer):
    """``none``: keeps every visual token (the unpruned upper bound through the same code path)."""

    name = "none"

    def select(self, sig: SegmentSignals) -> Selection:
        return Selection(keep=sig.mask.clone(), scores=masked_scores(torch.ones_like(sig.mask, dtype=torch.float32), sig.mask))


@register_method(name="none", family="baseline", stages="-", options=("layer",))
def none_plan(keep=1.0, layer: int = 0):
    """``none`` preset: every visual token kept (``keep`` is ignored)."""
    return [Stage(layer=layer, scorer=KeepAllScorer(), keep=1.0)]


__all__ = ["RandomScorer", "UniformScorer", "KeepAllScorer", "grid_points", "uniform_keep", "topk_mask", "random_plan",
           "uniform_plan", "none_plan"]
