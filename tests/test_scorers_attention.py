"""Attention-based scorers on small hand-checkable signals."""

import pytest
import torch

from vtoken.scorers import (
    FasterVLMScorer,
    FastVScorer,
    PyramidDropScorer,
    SparseVLMScorer,
    VisionZipScorer,
    ZipVLScorer,
)
from vtoken.scorers.testing import make_signals, random_signals


def kept(sel, s=0):
    return sel.keep[s].nonzero().flatten().tolist()


def test_fastv_keeps_top_head_mean_attention():
    a = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.3, 0.1, 0.5, 0.1]])  # (H=2, n=4): mean .2 .3 .35 .15
    sig = make_signals([4], [2], attn_last=[a])
    sel = FastVScorer().select(sig)
    assert kept(sel) == [1, 2]
    torch.testing.assert_close(sel.scores[0], torch.tensor([0.2, 0.3, 0.35, 0.15]))


def test_pyramiddrop_scorer_is_last_token_attention():
    a = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    sel = PyramidDropScorer().select(make_signals([4], [1], attn_last=[a]))
    assert kept(sel) == [0]


# ----------------------------------------------------------------------------- debias


def planted_trend_signals(n=48, important=5, debias_kind="linear"):
    """Attention rising linearly with position (recency bias), one planted important token early."""
    pos = torch.arange(n).float()
    trend = 0.005 * (1 + 5 * pos / (n - 1))  # last token gets 6x the first
    att = trend.clone()
    att[important] = trend[important] * 3.0  # 3x its neighbours, but below the late tokens
    att = att / att.sum()
    assert att.argmax() != important
    return make_signals([n], [1], attn_last=[att.unsqueeze(0).repeat(2, 1)])


@pytest.mark.parametrize("trend", ["exp", "linear"])
def test_debias_removes_planted_recency_trend(trend):
    sig = planted_trend_signals()
    assert kept(FastVScorer().select(sig)) != [5]  # biased: a late token wins
    sel = FastVScorer(debias=True, debias_trend=trend, debias_padding=False).select(planted_trend_signals())
    assert kept(sel) == [5]


def test_debias_uses_original_positions_of_already_pruned_segments():
    # candidates are a subset (original indices 0, 10, 20, 30, 40); trend over ORIGINAL index
    idx = [0, 10, 20, 30, 40]
    base = torch.tensor([0.01 * (1 + i / 8) for i in idx])
    base[1] *= 2.5
    sig = make_signals([5], [1], index=[idx], original=[48], attn_last=[base.unsqueeze(0)])
    assert kept(FastVScorer(debias=True, debias_padding=False).select(sig)) == [1]


def test_debias_suppresses_empty_padding_tokens():
    g = torch.Generator().manual_seed(0)
    n = 40
    hidden = torch.randn(n, 32, generator=g)
    hidden[28:] = torch.randn(32, generator=g)  # 12 identical "padding" patches at the end
    att = torch.full((n,), 0.01)
    att[30] = 0.2  # sink-like inflated attention on a padding patch
    att[3] = 0.05
    sig = make_signals([n], [1], attn_last=[att.unsqueeze(0)], hidden=[hidden])
    assert kept(FastVScorer().select(sig)) == [30]
    sig = make_signals([n], [1], attn_last=[att.unsqueeze(0)], hidden=[hidden])
    scorer = FastVScorer(debias=True)
    assert "hidden" in scorer.needs
    sel = scorer.select(sig)
    assert kept(sel) == [3]
    assert sig.diagnostics["debias_empty"].tolist() == [12]


def test_exclude_sinks_ranks_massive_activation_tokens_last():
    g = torch.Generator().manual_seed(1)
    n, D = 10, 1024
    hidden = torch.randn(n, D, generator=g)
    hidden[2, 7] = 600.0
    att = torch.tensor([0.05, 0.05, 0.5, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])
    sig = make_signals([n], [2], attn_last=[att.unsqueeze(0)], hidden=[hidden])
    assert 2 in kept(FastVScorer().select(sig))
    sig = make_signals([n], [2], attn_last=[att.unsqueeze(0)], hidden=[hidden])
    sel = FastVScorer(exclude_sinks=True).select(sig)
    assert kept(sel) == [0, 3]
    assert sig.diagnostics["sinks"].tolist() == [1]
    # a budget that exceeds the non-sink tokens still takes the sink (exact budget)
    sig = make_signals([n], [n], attn_last=[att.unsqueeze(0)], hidden=[hidden])
    assert FastVScorer(exclude_sinks=True).select(sig).keep.sum() == n


# ----------------------------------------------------------------------------- SparseVLM


def test_sparsevlm_raters_and_scores():
    # 3 visual tokens, 3 text tokens; text 0 and 2 are aligned with the image, text 1 is not
    v = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [4.0, 4.0, 0, 0]])
    t = torch.tensor([[4.0, 4.0, 0, 0], [0, 0, 0, 4.0], [4.0, 0, 0, 0]])
    att = torch.zeros(1, 3, 3)  # (H, T, n)
    att[0, 0] = torch.tensor([0.1, 0.7, 0.2])
    att[0, 1] = torch.tensor([0.9, 0.05, 0.05])  # the non-rater looks at token 0
    att[0, 2] = torch.tensor([0.2, 0.5, 0.3])
    sig = make_signals([3], [1], text_counts=[3], hidden=[v], text_hidden=[t], attn_text=[att])
    scorer = SparseVLMScorer()
    r = scorer.raters(sig)
    assert r[0].tolist() == [True, False, True]
    sel = scorer.select(sig)
    assert kept(sel) == [1]  # mean of raters' rows: [.15, .6, .25]
    torch.testing.assert_close(sel.scores[0], torch.tensor([0.15, 0.6, 0.25]))


def test_sparsevlm_recycle_exact_budget_and_merge_targets():
    kw = random_signals([40, 25], [10, 6], text_counts=[5, 4], seed=3)
    sig = make_signals(**kw)
    sel = SparseVLMScorer(recycle=True).select(sig)
    assert sel.keep.sum(1).tolist() == [10, 6]
    assert not (sel.keep & ~sig.mask).any()
    mi = sel.merge_into
    for s in range(2):
        src = (mi[s] >= 0).nonzero().flatten()
        assert len(src) > 0
        assert sel.keep[s, mi[s, src]].all()  # merged into kept slots
        assert not sel.keep[s, src].any()  # only dropped tokens are merged
    # clusters: deleted=30 -> pool int(0.3*30)+1 = 10 -> int(10*0.1)+1 = 2 clusters
    assert sig.diagnostics["recycled_clusters"].tolist()[0] == 2
    plain = SparseVLMScorer().select(make_signals(**kw))
    # the first budget-clusters tokens by score are kept in both
    top8 = torch.sort(plain.scores[0], descending=True, stable=True).indices[:8]
    assert sel.keep[0, top8].all()


# ----------------------------------------------------------------------------- pre-LLM


def test_fastervlm_ranks_vision_cls_attention():
    sig = make_signals([5], [2], vision_attn=[torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])])
    assert FasterVLMScorer.pre_llm_only
    assert kept(FasterVLMScorer().select(sig)) == [1, 3]


def test_visionzip_dominant_plus_contextual_merge():
    n = 20
    att = torch.linspace(1.0, 0.0, n)  # token 0 most attended
    keys = torch.zeros(n, 2)
    keys[:, 0] = 1.0
    keys[10:, 0] = 0.0
    keys[10:, 1] = 1.0  # two key groups: tokens < 10 and tokens >= 10
    sig = make_signals([n], [8], vision_attn=[att], vision_keys=[keys])
    z = VisionZipScorer(contextual_ratio=2 / 8)
    assert z.split(8) == (6, 2)
    sel = z.select(sig)
    assert sel.keep.sum() == 8
    assert kept(sel)[:6] == [0, 1, 2, 3, 4, 5]  # dominant
    rest = list(range(6, n))  # 14 remaining, step 7 -> targets rest[0], rest[7] = 6, 13
    targets = [6, 13]
    assert kept(sel) == sorted([0, 1, 2, 3, 4, 5] + targets)
    mi = sel.merge_into[0]
    for j in rest:
        if j in targets:
            assert mi[j] == -1
        else:
            assert int(mi[j]) == (6 if j < 10 else 13)  # most similar key
    assert (mi[:6] == -1).all()


def _visionzip_loop(z, sig):
    """VisionZip's selection written per segment with Python loops (the reference)."""
    from vtoken.scorers import functional as F
    from vtoken.scorers.base import topk_mask

    scores = z.score(sig)
    S, n = sig.mask.shape
    budgets = sig.budget.tolist()
    keep = topk_mask(scores, sig.mask, torch.tensor([z.split(b)[0] for b in budgets]))
    merge_into = torch.full((S, n), -1, dtype=torch.long)
    keys = F.unit_rows(sig.vision_keys)
    for s in range(S):
        contextual = z.split(budgets[s])[1]
        rest = (sig.mask[s] & ~keep[s]).nonzero().flatten().tolist()
        if contextual == 0 or not rest:
            continue
        step = max(1, len(rest) // contextual)
        targets = rest[0::step][:contextual]
        keep[s, targets] = True
        for j in rest:
            if j not in targets:
                sims = [float(keys[s, j] @ keys[s, t]) for t in targets]
                merge_into[s, j] = targets[sims.index(max(sims))]
    return keep, merge_into


@pytest.mark.parametrize("seed", range(4))
def test_visionzip_vectorised_equals_per_segment_loop(seed):
    """Segments of different sizes and budgets (1: no contextual token; >= the count: nothing
    left to merge; ratio 0.3: a non-dyadic split) against the per-segment reference."""
    gen = torch.Generator().manual_seed(seed)
    counts, budgets = [30, 17, 9, 5, 12], [10, 1, 9, 7, 4]
    att = [torch.rand(c, generator=gen) for c in counts]
    keys = [torch.randn(c, 6, generator=gen) for c in counts]
    sig = make_signals(counts, budgets, vision_attn=att, vision_keys=keys)
    for ratio in (10 / 64, 0.3):
        z = VisionZipScorer(contextual_ratio=ratio)
        sel = z.select(sig)
        keep, merge_into = _visionzip_loop(z, sig)
        assert torch.equal(sel.keep, keep) and torch.equal(sel.merge_into, merge_into)
        assert sel.keep.sum(1).tolist() == [min(b, c) for b, c in zip(budgets, counts)]


def test_visionzip_default_split_is_54_plus_10():
    z = VisionZipScorer()
    assert z.split(64) == (54, 10)
    assert z.split(192) == (162, 30)
    assert z.split(128) == (108, 20)
    assert z.split(1) == (1, 0)


# ----------------------------------------------------------------------------- ZipVL


def test_zipvl_picks_smallest_set_reaching_threshold():
    a = torch.tensor([0.05, 0.40, 0.05, 0.30, 0.20])  # sorted: .4 .3 .2 .05 .05
    sig = make_signals([5, 5], [5, 2], attn_last=[a.unsqueeze(0), a.unsqueeze(0)])
    sel = ZipVLScorer(threshold=0.85).select(sig)
    assert ZipVLScorer.adaptive
    assert kept(sel, 0) == [1, 3, 4]  # .9 >= .85 with 3 tokens, .7 < .85 with 2
    assert kept(sel, 1) == [1, 3]  # capped by the budget
    assert sig.diagnostics["zipvl_count"].tolist() == [3, 2]
    sig = make_signals([5], [5], attn_last=[a.unsqueeze(0)])
    assert ZipVLScorer(threshold=0.4).select(sig).keep.sum() == 1
    sig = make_signals([5], [5], attn_last=[a.unsqueeze(0)])
    assert ZipVLScorer(threshold=1.0).select(sig).keep.sum() == 5


def test_zipvl_never_below_one_nor_above_budget():
    sig = make_signals(**random_signals([30, 12, 1], [10, 12, 1], seed=9))
    sel = ZipVLScorer(threshold=0.5).select(sig)
    got = sel.keep.sum(1)
    assert (got >= 1).all() and (got <= sig.budget).all()
    assert torch.equal(got, sig.diagnostics["zipvl_count"])


def ref_zipvl(att, tau, budget):
    """The paper's rule in plain Python: heads averaged, normalised to sum 1 over the candidates,
    p = min{p : sum_{j<=p} a_sorted(j) >= tau} (float tolerance 1e-6), capped by the budget and at
    least 1; the p largest kept (ties: lower index). att (H, n) -> sorted kept indices."""
    H, n = att.shape
    a = [sum(float(att[h, v]) for h in range(H)) / H for v in range(n)]
    total = sum(a)
    a = [x / total for x in a] if total > 0 else [1.0 / n] * n
    order = sorted(range(n), key=lambda v: (-a[v], v))
    acc, p = 0.0, n
    for i, v in enumerate(order):
        acc += a[v]
        if acc >= tau - 1e-6:
            p = i + 1
            break
    return sorted(order[:max(1, min(p, budget))])


@pytest.mark.parametrize("seed", range(4))
def test_zipvl_per_layer_chain_matches_reference(seed):
    """Per-layer ZipVL (the preset's stages, in order) on hand-built ragged segments: each layer decides
    its own ratio among the survivors of the previous layer (original indices carried in ``index``)."""
    from vtoken.methods import build_plan

    plan = build_plan("zipvl", 1.0, per_layer=True, num_layers=4, K=1, threshold=0.8)
    assert [st.layer for st in plan] == [1, 2, 3]
    g = torch.Generator().manual_seed(seed)
    counts, budget = [12, 5, 9, 1], [12, 3, 9, 1]
    # per layer and segment, rows that sharpen from layer to layer
    rows = [[torch.softmax(torch.randn(2, c, generator=g) * sharp, dim=-1) for c in counts] for sharp in (0.5, 1.5, 3.0)]
    alive = [list(range(c)) for c in counts]
    ref_alive = [list(range(c)) for c in counts]
    sizes = []
    for st, layer_rows in zip(plan, rows):
        sig = make_signals([len(a) for a in alive], [min(b, len(a)) for b, a in zip(budget, alive)], index=alive,
                           original=counts, attn_last=[r[:, a] for r, a in zip(layer_rows, alive)])
        sel = st.scorer.select(sig)
        alive = [[a[j] for j in kept(sel, s)] for s, a in enumerate(alive)]
        ref_alive = [[a[j] for j in ref_zipvl(r[:, a], 0.8, min(b, len(a)))]
                     for r, a, b in zip(layer_rows, ref_alive, budget)]
        assert alive == ref_alive
        sizes.append(len(alive[0]))
    assert sizes[0] > sizes[2] >= 1  # sharper rows: fewer important tokens


def test_zipvl_per_layer_plan():
    from vtoken.errors import PruningConfigError
    from vtoken.methods import build_plan

    plan = build_plan("zipvl", 1.0, per_layer=True, num_layers=32)
    assert [st.layer for st in plan] == list(range(2, 32))
    assert all(st.scorer is plan[0].scorer and st.scorer.threshold == 0.975 and st.keep == 1.0 for st in plan)
    assert [st.layer for st in build_plan("zipvl", 64, per_layer=True, num_layers=8, K=5)] == [5, 6, 7]
    assert [st.layer for st in build_plan("zipvl", 64)] == [2]  # default: the adaptive count once, at K
    with pytest.raises(PruningConfigError, match="num_layers"):
        build_plan("zipvl", 1.0, per_layer=True)
    with pytest.raises(PruningConfigError):
        build_plan("zipvl", 1.0, per_layer=True, num_layers=4, K=4)


def test_modifier_options_validated():
    with pytest.raises(ValueError):
        FastVScorer(debias_trend="quadratic")
    with pytest.raises(ValueError):
        ZipVLScorer(threshold=0.0)
    with pytest.raises(ValueError):
        VisionZipScorer(contextual_ratio=1.5)
    assert FastVScorer.needs == frozenset({"attn_last"})
    assert FastVScorer().needs == frozenset({"attn_last"})
    assert FastVScorer(debias=True, debias_padding=False).needs == frozenset({"attn_last"})
    assert "hidden" in FastVScorer(exclude_sinks=True).needs
