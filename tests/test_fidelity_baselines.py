"""Baselines ``random``, ``uniform`` and ``none`` against hand-computed expectations (no paper or
released code defines them: the expectations follow their documented rules)."""

import pytest
import torch

from vtoken.methods import build_plan
from vtoken.scorers import KeepAllScorer, RandomScorer, UniformScorer
from vtoken.scorers.testing import make_signals


def kept(sel, s=0):
    return sel.keep[s].nonzero().flatten().tolist()


# ----------------------------------------------------------------------------- uniform


def test_uniform_hand_computed_grids():
    # 4 x 4 image, 4 tokens: the centres of a 2 x 2 lattice, rows/cols 1 and 3
    sig = make_signals([16], [4], grid=[(1, 4, 4)])
    assert kept(UniformScorer().select(sig)) == [5, 7, 13, 15]
    # 24 x 24 (LLaVA-1.5), 144 tokens: every second row and column, starting at 1
    sig = make_signals([576], [144], grid=[(1, 24, 24)])
    assert kept(UniformScorer().select(sig)) == [r * 24 + c for r in range(1, 24, 2) for c in range(1, 24, 2)]
    # 2 x 2 x 3 video, 3 tokens: frame 0 gets 2 (row 1, cols 0 and 2), frame 1 gets 1 (row 1, col 1)
    sig = make_signals([12], [3], grid=[(2, 2, 3)])
    assert kept(UniformScorer().select(sig)) == [3, 5, 6 + 4]


def test_uniform_without_grid_spaces_evenly_and_batches():
    # no grid: slot int((i + 0.5) * n / k); batched, ragged, each row on its own
    sig = make_signals([10, 7, 3], [3, 2, 3], grid=[None, None, None])
    sel = UniformScorer().select(sig)
    assert [kept(sel, s) for s in range(3)] == [[1, 5, 8], [1, 5], [0, 1, 2]]
    # an already-pruned image (candidates != original) also falls back to even spacing
    sig = make_signals([4], [2], index=[[0, 5, 10, 15]], original=[16], grid=[(1, 4, 4)])
    assert kept(UniformScorer().select(sig)) == [1, 3]


# ----------------------------------------------------------------------------- random


def ref_random_kept(seed, ordinal, original, index, budget):
    """The documented draw: one uniform table per (seed, segment ordinal, original size), read at
    the candidates' original indices; the budget largest kept (ties: lower slot)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + ordinal * 7919 + original)
    table = torch.rand(original, generator=g).tolist()
    order = sorted(range(len(index)), key=lambda j: (-table[index[j]], j))
    return sorted(order[:budget])


@pytest.mark.parametrize("seed", [0, 3])
def test_random_matches_the_documented_draw_and_is_batch_free(seed):
    counts, budget = [20, 7, 12], [5, 3, 4]
    sig = make_signals(counts, budget)
    sig.ordinal = torch.tensor([0, 1, 0])
    sel = RandomScorer(seed=seed).select(sig)
    for s, (c, k) in enumerate(zip(counts, budget)):
        assert kept(sel, s) == ref_random_kept(seed, int(sig.ordinal[s]), c, list(range(c)), k)
    # a segment alone keeps the same slots
    alone = make_signals([12], [4])
    assert kept(RandomScorer(seed=seed).select(alone)) == kept(sel, 2)
    # another seed, another draw
    assert [kept(RandomScorer(seed=seed + 1).select(make_signals(counts, budget)), s) for s in range(3)] != \
        [kept(sel, s) for s in range(3)]


def test_random_stages_nest():
    # pruning 20 -> 8 -> 3 keeps the same 3 original tokens as 20 -> 3 (scores follow the
    # token's original index)
    first = kept(RandomScorer().select(make_signals([20], [8])))
    second = RandomScorer().select(make_signals([8], [3], index=[first], original=[20]))
    assert sorted(first[j] for j in kept(second)) == kept(RandomScorer().select(make_signals([20], [3])))
    assert ref_random_kept(0, 0, 20, first, 3) == kept(second)


# ----------------------------------------------------------------------------- none


def test_none_keeps_everything_whatever_the_budget():
    sig = make_signals([5, 3, 1], [1, 0, 1])
    sel = KeepAllScorer().select(sig)
    assert [kept(sel, s) for s in range(3)] == [[0, 1, 2, 3, 4], [0, 1, 2], [0]]
    plan = build_plan("none", 0.1)
    assert len(plan) == 1 and plan[0].keep == 1.0
