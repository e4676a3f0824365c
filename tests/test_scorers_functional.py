"""The pure math under the scorers, checked against explicit / NumPy computations."""

import numpy as np
import pytest
import torch

from conftest import count_syncs
from vtoken.scorers import attention_rollout, erank
from vtoken.scorers import functional as F
from vtoken.scorers.flow import rollout_row


# ----------------------------------------------------------------------------- erank


def numpy_erank(x):
    sv = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    p = sv / sv.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (1, 4), (30, 30)])
def test_erank_matches_numpy_svd(shape):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    x = torch.randn(*shape, generator=g)
    assert float(erank(x)) == pytest.approx(numpy_erank(x.numpy()), rel=1e-5)


def test_erank_extremes():
    # rank one -> 1; orthonormal rows (equal singular values) -> full rank
    v = torch.randn(6)
    assert float(erank(torch.outer(torch.arange(1.0, 5.0), v))) == pytest.approx(1.0, abs=1e-5)
    assert float(erank(torch.eye(5))) == pytest.approx(5.0, rel=1e-6)
    assert float(erank(torch.zeros(3, 4))) == 0.0
    assert float(erank(torch.zeros(0, 4))) == 0.0
    assert erank(torch.eye(3)).dtype == torch.float32
    with pytest.raises(ValueError):
        erank(torch.zeros(2, 3, 4))


def test_erank_per_segment_uses_kept_rows_only():
    h = torch.randn(2, 6, 4)
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[0, :3] = True
    keep[1, [1, 4]] = True
    got = F.erank_per_segment(h, keep)
    assert got[0] == pytest.approx(float(erank(h[0, :3])))
    assert got[1] == pytest.approx(float(erank(h[1, [1, 4]])))


# ----------------------------------------------------------------------------- rollout


def explicit_rollout(a, residual):
    layers, m, _ = a.shape
    mats = []
    for layer in range(layers):
        al = residual * np.eye(m) + (1 - residual) * a[layer]
        mats.append(al / al.sum(axis=1, keepdims=True))
    out = np.eye(m)
    for al in mats:  # later layers multiply from the left
        out = al @ out
    return out


@pytest.mark.parametrize("residual", [0.5, 0.0, 0.8])
@pytest.mark.parametrize("layers", [1, 3])
def test_rollout_equals_explicit_matrix_product(residual, layers):
    g = torch.Generator().manual_seed(layers)
    m = 6
    causal = torch.triu(torch.full((m, m), float("-inf")), 1)
    a = torch.softmax(torch.randn(layers, m, m, generator=g) + causal, dim=-1)
    got = attention_rollout(a, residual=residual)
    want = explicit_rollout(a.double().numpy(), residual)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # hand check of the 2-layer case: R = A'_1 @ A'_0
    if layers == 3:
        a0 = residual * torch.eye(m) + (1 - residual) * a[0]
        a1 = residual * torch.eye(m) + (1 - residual) * a[1]
        a2 = residual * torch.eye(m) + (1 - residual) * a[2]
        torch.testing.assert_close(got, a2 @ a1 @ a0, rtol=1e-5, atol=1e-6)
    # rows of a rollout of row-stochastic matrices stay stochastic
    torch.testing.assert_close(got.sum(-1), torch.ones(m), rtol=1e-5, atol=1e-5)


def test_rollout_row_is_the_rollout_row():
    g = torch.Generator().manual_seed(3)
    a = torch.softmax(torch.randn(2, 3, 7, 7, generator=g), dim=-1)
    q = torch.tensor([6, 2])
    rows = rollout_row(a, q, residual=0.5)
    full = attention_rollout(a, residual=0.5)  # batched (2, 7, 7)
    torch.testing.assert_close(rows, full[torch.arange(2), q], rtol=1e-5, atol=1e-6)


def test_rollout_rejects_bad_shape():
    with pytest.raises(ValueError):
        attention_rollout(torch.ones(4, 4))


# ----------------------------------------------------------------------------- greedy max-min


def _distances_and_picks(h, mask, keep, order, s):
    """Segment s: float64 cosine distances (n, n), its real slots, and its picks in pick order."""
    z = h[s].double().numpy()
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    real = mask[s].nonzero().flatten().tolist()
    picks = [int(j) for j in sorted(keep[s].nonzero().flatten().tolist(), key=lambda j: int(order[s, j]))]
    return 1 - z @ z.T, real, picks


def test_greedy_maxmin_property_and_counts():
    """Every pick maximises the minimum cosine distance to the already-picked set."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 20, 8, generator=g)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False
    budget = torch.tensor([9, 6])
    keep, order = F.greedy_maxmin(h, mask, budget)
    assert keep.sum(1).tolist() == [9, 6]
    assert not (keep & ~mask).any()
    for s in range(2):
        d, real, picks = _distances_and_picks(h, mask, keep, order, s)
        # first pick: the token whose nearest other token is farthest
        nn = {j: min(d[j, i] for i in real if i != j) for j in real}
        assert nn[picks[0]] == pytest.approx(max(nn.values()), abs=1e-6)
        for t in range(1, len(picks)):
            chosen = picks[:t]
            mind = {j: min(d[j, i] for i in chosen) for j in real if j not in chosen}
            assert mind[picks[t]] == pytest.approx(max(mind.values()), abs=1e-6)


def test_greedy_maxmin_seed_counts_against_budget():
    h = torch.randn(1, 10, 4)
    mask = torch.ones(1, 10, dtype=torch.bool)
    seed = torch.zeros(1, 10, dtype=torch.bool)
    seed[0, [2, 7]] = True
    keep, order = F.greedy_maxmin(h, mask, torch.tensor([5]), seed=seed)
    assert keep.sum() == 5 and keep[0, 2] and keep[0, 7]
    assert sorted(order[0][keep[0]].tolist()) == [0, 1, 2, 3, 4]


def test_greedy_maxmin_with_seeds_property():
    """With seeds (AgilePruner's use): every later pick maximises the minimum cosine distance to
    the seeds plus the earlier picks, per segment, for segments with and without seeds."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 16, 5, generator=g)
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[2, 11:] = False
    seed = torch.zeros(3, 16, dtype=torch.bool)
    seed[0, [1, 9]] = True
    seed[2, 4] = True
    budget = torch.tensor([6, 4, 5])
    keep, order = F.greedy_maxmin(h, mask, budget, seed=seed)
    assert keep.sum(1).tolist() == [6, 4, 5] and not (keep & ~mask).any() and (keep | ~seed).all()
    for s in range(3):
        d, real, picks = _distances_and_picks(h, mask, keep, order, s)
        n_seed = int(seed[s].sum())
        assert set(picks[:n_seed]) == set(seed[s].nonzero().flatten().tolist())
        for t in range(max(n_seed, 1), len(picks)):
            chosen = picks[:t]
            mind = {j: min(d[j, i] for i in chosen) for j in real if j not in chosen}
            assert mind[picks[t]] == pytest.approx(max(mind.values()), abs=1e-6)


def test_greedy_maxmin_loop_does_not_sync():
    """The selection loop runs without host syncs: the sync-causing ops of a whole call are the
    two before the loop (is a first pick needed, how many steps), whatever the budget."""
    h = torch.randn(4, 40, 6)
    mask = torch.ones(4, 40, dtype=torch.bool)
    counts = []
    for b in (3, 20):
        counts.append(count_syncs(lambda: F.greedy_maxmin(h, mask, torch.full((4,), b))))
    assert counts[0] == counts[1] <= 2, counts


def test_greedy_maxmin_duplicates_and_single_candidate():
    # identical tokens: still exactly budget picks; a lone candidate is picked
    h = torch.ones(2, 4, 3)
    mask = torch.tensor([[True] * 4, [True, False, False, False]])
    keep, _ = F.greedy_maxmin(h, mask, torch.tensor([3, 1]))
    assert keep.sum(1).tolist() == [3, 1] and keep[1, 0]


# ----------------------------------------------------------------------------- attention helpers


def test_cumulative_share_count_is_smallest_prefix():
    att = torch.tensor([[0.5, 0.1, 0.3, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25, 0.0]])
    mask = torch.tensor([[True] * 5, [True] * 4 + [False]])
    assert F.cumulative_share_count(att, mask, 0.8).tolist() == [2, 4]
    assert F.cumulative_share_count(att, mask, 0.5).tolist() == [1, 2]
    assert F.cumulative_share_count(att, mask, 0.81).tolist() == [3, 4]
    # all-zero attention: uniform, count by share
    assert F.cumulative_share_count(torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), 0.5).tolist() == [2]


def test_attention_entropy_bounds():
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    onehot = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 9.0, 9.0]])
    h = F.attention_entropy(onehot, mask)
    assert h[0] == pytest.approx(0.0, abs=1e-6)
    assert h[1] == pytest.approx(1.0, abs=1e-6)  # uniform over its 2 real slots, padding ignored


# ----------------------------------------------------------------------------- debiasing


@pytest.mark.parametrize("kind", ["exp", "linear"])
def test_remove_positional_trend_flattens_a_planted_trend(kind):
    n = 40
    pos = torch.arange(n).unsqueeze(0)
    mask = torch.ones(1, n, dtype=torch.bool)
    x = pos.float() / (n - 1)
    trend = 0.01 * (1 + 4 * x) if kind == "linear" else 0.01 * torch.exp(1.6 * x)
    flat = F.remove_positional_trend(trend, pos, mask, kind=kind)
    assert float(flat.std() / flat.mean()) < 0.05


def test_empty_tokens_finds_duplicate_padding():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, 40, 16, generator=g)
    h[0, 30:] = torch.randn(16, generator=g) + 0.001 * torch.randn(10, 16, generator=g)  # 10 padding patches
    mask = torch.ones(1, 40, dtype=torch.bool)
    empty = F.empty_tokens(h, mask)
    assert empty[0, 30:].all() and not empty[0, :30].any()


# ----------------------------------------------------------------------------- sinks


def test_visual_sinks_detects_planted_massive_activations():
    g = torch.Generator().manual_seed(2)
    D = 1024
    h = torch.randn(2, 12, D, generator=g)
    h[0, 3, 17] = 400.0   # massive activation in dim 17
    h[0, 8, 900] = -500.0  # and in dim 900 (sign does not matter)
    h[1, 5, 17] = 450.0
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 10:] = False
    h[1, 11, 17] = 900.0  # on a padding slot: never a sink
    sinks = F.visual_sinks(h, mask, tau=20.0)
    assert sinks[0].nonzero().flatten().tolist() == [3, 8]
    assert sinks[1].nonzero().flatten().tolist() == [5]
    dims = F.sink_dimensions(h, mask, tau=20.0)
    assert set(dims[0].tolist()) == {17, 900}
    # fixed dims (VAR's per-model table): only those dims count
    assert F.visual_sinks(h, mask, tau=20.0, dims=[900])[0].nonzero().flatten().tolist() == [8]
    # no massive activation at all -> no sink
    assert not F.visual_sinks(torch.randn(1, 5, D), torch.ones(1, 5, dtype=torch.bool)).any()


# ----------------------------------------------------------------------------- clustering


def test_dpc_knn_recovers_planted_clusters():
    g = torch.Generator().manual_seed(4)
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    x = torch.cat([c + 0.1 * torch.randn(5, 4, generator=g) for c in centres])
    cen, assign = F.dpc_knn(x, 3, k=3)
    assert len(set(cen.tolist())) == 3
    groups = [set(assign[i * 5:(i + 1) * 5].tolist()) for i in range(3)]
    assert all(len(gr) == 1 for gr in groups) and len(set.union(*groups)) == 3
    assert (assign[cen] == torch.arange(3)).all()


def test_masked_max_similarity_blocks_match_one_shot():
    """Blocked over segments and query rows (a tiny cap forces many blocks) == one full matmul;
    -inf (index 0) where a segment has no chosen column; ties -> the lowest column."""
    g = torch.Generator().manual_seed(2)
    z = F.unit_rows(torch.randn(3, 11, 4, generator=g))
    z[1, 7] = z[1, 2]  # an exact tie for row 1's columns 2 and 7
    cols = torch.rand(3, 11, generator=g) < 0.4
    cols[1, [2, 7]] = True
    cols[2] = False
    full = (z @ z.transpose(1, 2)).masked_fill(~cols.unsqueeze(1), float("-inf"))
    for cap in (1 << 24, 7, 1):
        v, i = F.masked_max_similarity(z, cols, cap=cap)
        torch.testing.assert_close(v, full.max(dim=2).values)
        assert torch.equal(i[:2], full.max(dim=2).indices[:2])
        assert torch.isinf(v[2]).all() and (v[2] < 0).all()
        assert int(i[1, 2]) == 2 and int(i[1, 7]) == 2
