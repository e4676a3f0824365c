"""One-launch greedy max-min selection (vtoken.kernels.greedy_select): the kernel against its
PyTorch reference, the reference against a plain loop written from DivPrune's released selection
(its full distance matrix; vbdi/divprune@799e2d9), and DivPrune's scorer on the Gram path against
the per-pick path it replaces.

Without CUDA the kernel runs through Triton's interpreter; ``gpu`` tests run on a CUDA device.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vtoken.kernels import HAS_TRITON  # noqa: E402
from vtoken.kernels.greedy_select import greedy_maxmin_gram, greedy_maxmin_gram_reference  # noqa: E402
from vtoken.scorers import functional as F  # noqa: E402
from vtoken.scorers import functional_diversity as FD  # noqa: E402

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _problem(counts, n, D=8, seed=0, seeds=None, duplicate=False, device="cpu"):
    """Padded segments of random unit rows (S, n, D) -> the kernel's inputs for fresh picks."""
    g = torch.Generator().manual_seed(seed)
    S = len(counts)
    x = torch.randn(S, n, D, generator=g)
    if duplicate:  # exact ties: every row's slot 1 repeats slot 0
        x[:, 1] = x[:, 0]
    mask = torch.arange(n).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    z = FD.unit_rows(x)
    gram = z @ z.transpose(1, 2)
    keep = torch.zeros(S, n, dtype=torch.bool)
    order = torch.full((S, n), -1, dtype=torch.long)
    picked = torch.zeros(S, dtype=torch.long)
    mind = torch.full((S, n), float("inf"))
    if seeds is not None:
        keep = seeds & mask
        order = torch.where(keep, keep.long().cumsum(1) - 1, order)
        picked = keep.sum(1)
        mind = torch.where(keep.any(1, keepdim=True),
                           1.0 - gram.masked_fill(~keep.unsqueeze(1), float("-inf")).amax(2), mind)
    first = FD.nearest_neighbour_distance(z, mask, gram)
    args = [gram, mask, mind, first, keep, order, picked]
    return x, [a.to(device) if a is not None else None for a in args]


def _run(fn, args, steps):
    gram, mask, mind, first, keep, order, picked = args
    return fn(gram, mask, steps.to(mask.device), mind, first, keep, order, picked)


def ref_released(x, budget):
    """DivPrune's released loop (float64): full distance matrix; first pick = the largest
    second-smallest entry of a column; then the largest minimum distance to the picks; first maximum."""
    x = np.asarray(x, dtype=np.float64)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1.0 - z @ z.T
    picks = []
    for i in range(min(budget, len(x))):
        scores = (np.sort(dist, axis=0)[1] if len(x) > 1 else np.zeros(1)) if i == 0 else dist[picks].min(axis=0)
        picks.append(int(np.argmax(scores)))
    return picks


@pytest.mark.parametrize("seed", range(4))
def test_reference_picks_the_released_order(seed):
    counts, budget = [30, 6, 17, 1, 11], [8, 6, 5, 1, 2]
    x, args = _problem(counts, 32, seed=seed)
    keep, order = _run(greedy_maxmin_gram_reference, args, torch.tensor(budget))
    for s, c in enumerate(counts):
        picks = sorted((int(order[s, j]), j) for j in range(32) if keep[s, j])
        assert [j for _, j in picks] == ref_released(x[s, :c], budget[s]), s  # the same tokens, in pick order
        assert [r for r, _ in picks] == list(range(budget[s]))


@needs_triton
@pytest.mark.parametrize("case", ["fresh", "seeded", "ties", "no_first", "zero_steps", "wide"])
def test_kernel_equals_reference(case):
    counts, n = [30, 6, 17, 1, 11, 0], 32
    seeds = duplicate = None
    if case == "seeded":
        seeds = torch.zeros(len(counts), n, dtype=torch.bool)
        seeds[0, [3, 9]] = True
        seeds[2, 0] = True
    if case == "wide":
        counts, n = [600, 250], 640
    x, args = _problem(counts, n, seed=7, seeds=seeds, duplicate=case == "ties")
    if case == "no_first":
        args[3] = None
    budget = torch.tensor([min(c, b) for c, b in zip(counts, [8, 6, 5, 1, 2, 0][:len(counts)] if case != "wide"
                                                     else [64, 250])])
    steps = (budget - args[6]).clamp(min=0) if case != "zero_steps" else torch.zeros(len(counts), dtype=torch.long)
    ref = _run(greedy_maxmin_gram_reference, args, steps)
    got = _run(lambda *a: greedy_maxmin_gram(*a, backend="triton"), args, steps)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert (got[0].sum(1) == args[6] + steps).all()  # exactly the picks asked for


def test_scorer_gram_path_equals_per_pick_path(monkeypatch):
    """greedy_maxmin on the Gram path and on the per-pick path it replaces (forced by a zero Gram
    cap) choose the same tokens in the same order on random features (no near-ties)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 40, 16, generator=g)
    mask = torch.arange(40).unsqueeze(0) < torch.tensor([[40], [23], [5]])
    budget = torch.tensor([10, 7, 5])
    seed = torch.zeros(3, 40, dtype=torch.bool)
    seed[1, 4] = True
    for sd in (None, seed):
        gram_path = F.greedy_maxmin(feats, mask, budget, seed=sd)
        monkeypatch.setattr(FD, "GRAM_ENTRIES", 0)
        loop_path = F.greedy_maxmin(feats, mask, budget, seed=sd)
        monkeypatch.undo()
        assert torch.equal(gram_path[0], loop_path[0]) and torch.equal(gram_path[1], loop_path[1])


def test_bad_inputs_raise():
    _, args = _problem([4], 4)
    gram, mask, mind, first, keep, order, picked = args
    with pytest.raises(ValueError, match="gram must be float32"):
        greedy_maxmin_gram(gram.double(), mask, torch.tensor([1]), mind, first, keep, order, picked)
    with pytest.raises(ValueError, match="keep must be"):
        greedy_maxmin_gram(gram, mask, torch.tensor([1]), mind, first, keep.long(), order, picked)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_equals_reference_on_cuda_at_llava_size():
    x, args = _problem([576] * 4 + [300], 576, D=64, seed=1, device="cuda")
    steps = torch.tensor([64, 64, 128, 192, 64])
    ref = _run(greedy_maxmin_gram_reference, args, steps)
    got = _run(lambda *a: greedy_maxmin_gram(*a, backend="triton"), args, steps)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
