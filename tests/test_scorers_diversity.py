"""Diversity scorers: DivPrune, DART, AgilePruner-style hybrid."""

import numpy as np
import pytest
import torch

from vtoken.scorers import AgileScorer, DARTScorer, DivPruneScorer, erank
from vtoken.scorers.testing import make_signals, random_signals


def kept(sel, s=0):
    return sel.keep[s].nonzero().flatten().tolist()


def test_divprune_greedy_maxmin_and_exact_counts():
    g = torch.Generator().manual_seed(11)
    hs = [torch.randn(15, 6, generator=g), torch.randn(9, 6, generator=g)]
    sig = make_signals([15, 9], [6, 4], hidden=hs)
    sel = DivPruneScorer().select(sig)
    assert sel.keep.sum(1).tolist() == [6, 4]
    for s, h in enumerate(hs):
        z = h.double().numpy()
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        d = 1 - z @ z.T
        n = len(z)
        # reproduce the greedy max-min selection from the scorer's pick order (score = n - rank)
        sc = sel.scores[s][: n]
        picks = [int(j) for j in torch.argsort(sc, descending=True, stable=True)[: int(sig.budget[s])]]
        nn = [min(d[j, i] for i in range(n) if i != j) for j in range(n)]
        assert nn[picks[0]] == pytest.approx(max(nn))
        for t in range(1, len(picks)):
            mind = {j: min(d[j, i] for i in picks[:t]) for j in range(n) if j not in picks[:t]}
            assert mind[picks[t]] == pytest.approx(max(mind.values()))
        assert set(picks) == set(kept(sel, s))
    e = sig.diagnostics["erank"]
    assert e[0] == pytest.approx(float(erank(hs[0][sel.keep[0, :15]])))


def test_divprune_prefers_spread_tokens():
    # 4 near-duplicates of one direction + 3 distinct directions: budget 4 takes one of the
    # duplicates and the 3 distinct ones
    base = torch.tensor([1.0, 0.0, 0.0, 0.0])
    h = torch.stack([base, base + 0.01, base + 0.02, base - 0.01,
                     torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0]),
                     torch.tensor([0.0, 0.0, 0.0, 1.0])])
    sel = DivPruneScorer().select(make_signals([7], [4], hidden=[h]))
    k = kept(sel)
    assert {4, 5, 6} <= set(k) and len(set(k) & {0, 1, 2, 3}) == 1


def test_dart_keeps_pivots_and_least_duplicated_tokens():
    # 8 visual tokens, 2 near-duplicate groups + 2 unique; pivot = token 0 (largest key L1 norm)
    h = torch.tensor([
        [1.0, 0, 0], [0.99, 0.01, 0], [0.98, 0.02, 0],  # duplicates of the pivot
        [0, 1.0, 0], [0, 0.99, 0.01],  # group B
        [0, 0, 1.0], [-1.0, 0, 0], [-0.5, -1.0, 0.0],  # dissimilar to the pivot
    ])
    keys = torch.ones(8, 2)
    keys[0] *= 10  # pivot
    sig = make_signals([8], [4], text_counts=[1], hidden=[h], normed_hidden=[h], keys=[keys],
                       text_hidden=[torch.tensor([[0.0, 0.0, 1.0]])], text_keys=[torch.ones(1, 2)])
    sel = DARTScorer(pivot_image=1, pivot_text=0).select(sig)
    k = kept(sel)
    assert 0 in k and len(k) == 4
    assert not ({1, 2} & set(k))  # duplicates of the pivot are dropped
    assert {6, 7} <= set(k)  # the least similar to the pivot are kept first


def test_dart_exact_budgets_with_text_pivots():
    for budgets in ([1, 1], [5, 3], [17, 11], [40, 12]):
        sig = make_signals(**random_signals([40, 12], budgets, text_counts=[6, 2], seed=2))
        sel = DARTScorer().select(sig)
        assert sel.keep.sum(1).tolist() == budgets
        assert not (sel.keep & ~sig.mask).any()
        assert sig.diagnostics["erank"].shape == (2,)


def test_agile_attention_share_follows_entropy():
    g = torch.Generator().manual_seed(7)
    n = 32
    hidden = torch.randn(n, 8, generator=g)
    peaked = torch.full((n,), 1e-4)
    peaked[[3, 9]] = 1.0  # concentrated evidence: low entropy -> mostly attention picks
    flat = torch.ones(n)  # spread evidence: entropy 1 -> all diversity picks
    sig = make_signals([n, n], [8, 8], attn_last=[peaked.unsqueeze(0), flat.unsqueeze(0)], hidden=[hidden, hidden])
    sel = AgileScorer().select(sig)
    assert sel.keep.sum(1).tolist() == [8, 8]
    h = sig.diagnostics["attn_entropy"]
    assert h[0] < 0.3 and h[1] == pytest.approx(1.0)
    share = sig.diagnostics["attention_share"]
    assert share[0] > 0.6 and share[1] == 0.0
    assert {3, 9} <= set(kept(sel, 0))
    # the all-diversity segment equals DivPrune's choice
    div = DivPruneScorer().select(make_signals([n], [8], hidden=[hidden]))
    assert kept(sel, 1) == kept(div)
    assert sig.diagnostics["erank"].shape == (2,)


def test_agile_share_bounds():
    sig = make_signals(**random_signals([20], [10], seed=1))
    sel = AgileScorer(min_attention_share=0.5, max_attention_share=0.5).select(sig)
    assert sel.keep.sum() == 10
    assert sig.diagnostics["attention_share"].tolist() == [0.5]
    with pytest.raises(ValueError):
        AgileScorer(min_attention_share=0.8, max_attention_share=0.2)


@pytest.mark.parametrize("S,n,D", [(5, 40, 16), (4, 10, 64), (3, 7, 7)])
def test_erank_per_segment_equals_erank_of_each_segment_with_one_sync(S, n, D):
    """The batched diagnostic equals :func:`erank` of each segment's kept rows (kept count above
    and below D, an empty segment, a full one, an all-zero one) and waits for the device once."""
    from conftest import count_syncs
    from vtoken.scorers.functional import erank_per_segment

    g = torch.Generator().manual_seed(S * n + D)
    hidden = torch.randn(S, n, D, generator=g)
    keep = torch.rand(S, n, generator=g) < 0.4
    keep[0] = False
    keep[1] = True
    hidden[2] = 0.0
    want = torch.stack([erank(hidden[s][keep[s]]) for s in range(S)])
    assert torch.allclose(erank_per_segment(hidden, keep), want, atol=1e-5)
    assert count_syncs(lambda: erank_per_segment(hidden, keep)) <= 2  # the kept count (+ eigvalsh's check)


@pytest.fixture
def syncs_outside_the_solver(monkeypatch):
    """A :class:`conftest.SyncCounter` that does not count inside DivPrune's pick loop (the solver is
    the kernel's, one launch on a GPU; test_kernels_greedy_select covers it)."""
    from conftest import SyncCounter
    from vtoken.kernels import greedy_select

    counter = SyncCounter()
    solver = greedy_select.greedy_maxmin_gram

    def unseen(*args, **kwargs):
        counter.on = False
        try:
            return solver(*args, **kwargs)
        finally:
            counter.on = True

    monkeypatch.setattr(greedy_select, "greedy_maxmin_gram", unseen)
    return counter


def test_greedy_maxmin_adds_no_host_sync_around_its_solver(syncs_outside_the_solver):
    """Outside the pick loop (one kernel launch on a GPU), DivPrune's selection without seeds reads
    nothing back from the device: a sync there waits for the whole queued prefill."""
    from vtoken.scorers import functional as F

    counter = syncs_outside_the_solver
    g = torch.Generator().manual_seed(3)
    feats, mask = torch.randn(2, 12, 8, generator=g), torch.ones(2, 12, dtype=torch.bool)
    with counter:
        keep, _ = F.greedy_maxmin(feats, mask, torch.tensor([4, 6]))
    assert keep.sum(1).tolist() == [4, 6]
    assert counter.total == 0, dict(counter.found)


def test_erank_diagnostic_is_computed_when_read_not_in_the_prefill(syncs_outside_the_solver):
    """DivPrune's effective-rank diagnostic costs the prefill no host sync and no decomposition: it is
    computed when first read (handle.stats), however it is read, and equals erank of the kept rows."""
    from vtoken.signals import Diagnostics

    counter = syncs_outside_the_solver
    g = torch.Generator().manual_seed(5)
    hs = [torch.randn(15, 6, generator=g), torch.randn(9, 6, generator=g)]
    sig = make_signals([15, 9], [6, 4], hidden=hs)
    with counter:
        sel = DivPruneScorer().select(sig)
    assert counter.total == 0, dict(counter.found)
    want = [float(erank(hs[s][sel.keep[s, :len(hs[s])]])) for s in range(2)]
    copied = Diagnostics.unresolved_copy(sig.diagnostics)  # what the stage hands to handle.stats
    for read in (lambda d: d["erank"], lambda d: d.get("erank"), lambda d: dict(d.items())["erank"],
                 lambda d: dict(d)["erank"], lambda d: {**d}["erank"], lambda d: list(d.values())[0]):
        assert read(Diagnostics.unresolved_copy(copied)).tolist() == pytest.approx(want)
    assert copied["erank"] is copied["erank"]  # computed once, then kept


def test_diagnostics_behave_as_a_dict_of_computed_values():
    import copy
    import pickle

    from vtoken.signals import Deferred, Diagnostics

    def make():
        d = Diagnostics()
        d["a"], d["b"] = Deferred(lambda: 7), 1
        return d

    assert make() == {"a": 7, "b": 1} and pickle.loads(pickle.dumps(make())) == {"a": 7, "b": 1}
    assert copy.deepcopy(make()) == {"a": 7, "b": 1} and repr(make()) == repr({"a": 7, "b": 1})
    assert make().pop("a") == 7 and make().setdefault("a") == 7 and make().pop("z", None) is None
    d = make()
    assert d.popitem() == ("b", 1) and d.popitem() == ("a", 7)
    with pytest.raises(KeyError):
        d.popitem()
