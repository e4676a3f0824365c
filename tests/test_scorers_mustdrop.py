"""MustDrop: the vision-stage merge and the prefill dual-attention filter held against plain-loop
references written from the released code's rule (liuting20/MustDrop@909afa5: ``conditional_pooling``
over 3x3 windows, ``dual_attention_filter``, the [CLS] key set), the preset, and end to end on tiny
models (kept sets on the recorded signals, batch == each sample alone, cache on == cache off)."""

import math

import pytest
import torch

import vtoken
import vtoken.hooks
import tiny_models as tm
from conftest import SUPPRESS, get_inputs, get_model, slice_sample
from vtoken.errors import PruningConfigError
from vtoken.methods import build_plan
from vtoken.scorers.mustdrop import MustDropMergeScorer, MustDropScorer, mustdrop_thresholds, window_groups
from vtoken.scorers.testing import make_signals
from test_scorers_e2e import last_slot

# ----------------------------------------------------------------------------- references (plain loops)


def ref_merge(hidden, grid, thr, window=3):
    """(kept original indices, {merged index: the index it merges into}) of the local spatial merge:
    non-overlapping window x window windows per frame from the top-left; a window whose mean cosine
    similarity over ordered pairs of distinct cells is >= thr keeps its last (bottom-right) cell."""
    t, h, w = grid
    x = torch.as_tensor(hidden).double()
    into = {}
    for f in range(t):
        for gi in range(h // window):
            for gj in range(w // window):
                cells = [f * h * w + (gi * window + a) * w + gj * window + b for a in range(window) for b in range(window)]
                sims = [float(torch.nn.functional.cosine_similarity(x[i], x[j], dim=0))
                        for i in cells for j in cells if i != j]
                if sum(sims) / len(sims) >= thr:
                    for c in cells[:-1]:
                        into[c] = cells[-1]
    return sorted(set(range(t * h * w)) - set(into)), into


def ref_filter(att, rows, va, original, gthr, ithr, ratio, budget):
    """Kept candidates of the dual-attention filter. att (H, T, n); rows: text rows after the image;
    va (n,) vision-encoder attention (None or NaN: no key set)."""
    H, T, n = att.shape
    A = [[sum(float(att[h, t, v]) for h in range(H)) / H for v in range(n)] for t in range(T)]
    g = [sum(A[t][v] for t in rows) for v in range(n)]
    m = [max([A[t][v] for t in rows], default=0.0) for v in range(n)]
    total = sum(g)
    drop = [g[v] < total * gthr and m[v] < ithr for v in range(n)]
    key = set()
    if va is not None and not math.isnan(float(va[0])):
        k = math.ceil(ratio * original)
        key = set(sorted(range(n), key=lambda v: (-float(va[v]), v))[:k])
    survive = [v for v in range(n) if not drop[v] or v in key]
    count = max(1, min(len(survive), budget))
    order = sorted(range(n), key=lambda v: (v not in key, v not in survive, -g[v], v))
    return sorted(order[:count])


def kept(sel, s):
    return sel.keep[s].nonzero().flatten().tolist()


# ----------------------------------------------------------------------------- vision stage: merge


def similar_windows_hidden(grid, similar, dim=8, seed=0):
    """Hidden states (t*h*w, dim): the cells of the windows listed in ``similar`` share one vector
    (plus tiny noise), every other token is random."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    x = torch.randn(t * h * w, dim, generator=g)
    groups = window_groups(grid, 3)
    for wi in similar:
        base = torch.randn(dim, generator=g)
        x[groups[wi]] = base + 0.01 * torch.randn(9, dim, generator=g)
    return x


def test_window_groups_tile_each_frame_from_the_top_left():
    g = window_groups((1, 6, 6), 3)
    assert g.tolist()[0] == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert g.tolist()[3] == [21, 22, 23, 27, 28, 29, 33, 34, 35]
    assert window_groups((1, 7, 8), 3).shape == (4, 9)  # the 7th row / 7th-8th columns: partial, none
    assert window_groups((2, 3, 3), 3).tolist() == [list(range(9)), list(range(9, 18))]
    assert window_groups((1, 2, 9), 3).shape == (0, 9)


def test_hand_built_merge():
    grid = (1, 6, 6)
    x = similar_windows_hidden(grid, similar=(0, 3))
    sig = make_signals([36], [36], hidden=[x], grid=[grid])
    sel = MustDropMergeScorer().select(sig)
    merged0 = [0, 1, 2, 6, 7, 8, 12, 13]
    merged3 = [21, 22, 23, 27, 28, 29, 33, 34]
    assert kept(sel, 0) == [i for i in range(36) if i not in merged0 + merged3]
    assert sel.merge_into[0, merged0].tolist() == [14] * 8 and sel.merge_into[0, merged3].tolist() == [35] * 8
    assert (sel.merge_into[0, sel.keep[0]] == -1).all()
    assert sig.diagnostics["mustdrop_merged_windows"].tolist() == [2]
    assert MustDropMergeScorer.adaptive and MustDropMergeScorer.pre_llm_only


@pytest.mark.parametrize("seed", range(4))
def test_random_segments_match_reference(seed):
    grids = [(1, 6, 6), (1, 7, 8), (2, 3, 6), (1, 2, 4)]
    g = torch.Generator().manual_seed(100 + seed)
    hidden = []
    for gr in grids:
        n_win = window_groups(gr, 3).shape[0]
        sim = [i for i in range(n_win) if torch.rand(1, generator=g) < 0.5]
        hidden.append(similar_windows_hidden(gr, sim, seed=seed * 10 + len(hidden)))
    counts = [t * h * w for t, h, w in grids]
    sig = make_signals(counts, counts, hidden=hidden, grid=grids)
    sel = MustDropMergeScorer(threshold=0.8).select(sig)
    for s, gr in enumerate(grids):
        ref_keep, into = ref_merge(hidden[s], gr, 0.8)
        assert kept(sel, s) == ref_keep
        assert {i: int(sel.merge_into[s, i]) for i in range(counts[s]) if sel.merge_into[s, i] >= 0} == into


def test_merge_cap_and_no_grid():
    grid = (1, 6, 6)
    x = similar_windows_hidden(grid, similar=(0, 1, 2, 3))  # 4 tokens after the merge
    sig = make_signals([36], [3], hidden=[x], grid=[grid])
    sel = MustDropMergeScorer().select(sig)
    assert kept(sel, 0) == [14, 17, 32]  # capped to 3: the merged tokens in slot order
    assert (sel.merge_into[0, [21, 22, 23, 27, 28, 29, 33, 34, 35]] == -1).all()  # window 3's target capped out
    with pytest.raises(PruningConfigError, match="grid"):
        MustDropMergeScorer().select(make_signals([36], [36], hidden=[x], grid=[None]))
    with pytest.raises(PruningConfigError):
        MustDropMergeScorer(window=1)


# ----------------------------------------------------------------------------- prefill stage: dual attention


def test_hand_built_dual_attention_filter():
    # one head; text row 0 precedes the image, rows 1-2 follow it; five candidates
    att = torch.tensor([[[0.9, 0.9, 0.9, 0.9, 0.9],
                         [0.30, 0.02, 0.05, 0.001, 0.20],
                         [0.20, 0.001, 0.30, 0.002, 0.01]]])
    after = [torch.tensor([False, True, True])]
    va = [torch.tensor([0.1, 0.2, 0.05, 0.6, 0.05])]
    # g = (.5, .021, .35, .003, .21), total 1.084; global_thr .05 -> g < .0542: candidates 1, 3;
    # m = (.3, .02, .3, .002, .2): individual_thr .01 -> only 3 is below both; key set ceil(.08*5)=1: {3}
    sig = make_signals([5], [5], text_counts=[3], attn_text=[att], text_after=after, vision_attn=va)
    sc = MustDropScorer(global_thr=0.05, individual_thr=0.01)
    assert kept(sc.select(sig), 0) == [0, 1, 2, 3, 4]  # 3 dropped by the filter, kept as key token
    sc = MustDropScorer(global_thr=0.05, individual_thr=0.03)
    sig = make_signals([5], [5], text_counts=[3], attn_text=[att], text_after=after, vision_attn=va)
    assert kept(sc.select(sig), 0) == [0, 2, 3, 4]  # 1 (m=.02) now dropped too
    sig = make_signals([5], [2], text_counts=[3], attn_text=[att], text_after=after, vision_attn=va)
    assert kept(sc.select(sig), 0) == [0, 3]  # capped: the key token first, then by global attention
    assert sig.diagnostics["mustdrop_key"].tolist() == [1] and sig.diagnostics["mustdrop_count"].tolist() == [2]
    nan = [torch.full((5,), float("nan"))]  # no encoder attention (video): no key set
    sig = make_signals([5], [5], text_counts=[3], attn_text=[att], text_after=after, vision_attn=nan)
    assert kept(sc.select(sig), 0) == [0, 2, 4]
    none_after = [torch.tensor([True, False, False])]  # text only before the image: nothing dropped
    sig = make_signals([5], [5], text_counts=[3], attn_text=[att], text_after=none_after, vision_attn=nan)
    sig.text_after = torch.zeros_like(sig.text_after)
    assert kept(sc.select(sig), 0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seed", range(6))
def test_random_ragged_segments_match_reference(seed):
    counts, text_counts, budget, original = [9, 4, 12, 6], [5, 3, 6, 4], [9, 2, 5, 6], [12, 4, 30, 6]
    g = torch.Generator().manual_seed(seed)
    att, after, va = [], [], []
    for s, (c, t) in enumerate(zip(counts, text_counts)):
        att.append(torch.softmax(torch.randn(3, t, c + t, generator=g) * 2, dim=-1)[:, :, :c])
        after.append(torch.arange(t) >= (0 if s == 1 else 1))
        va.append(torch.full((c,), float("nan")) if s == 3 else torch.softmax(torch.randn(c, generator=g) * 2, 0))
    sig = make_signals(counts, budget, text_counts=text_counts, original=original, attn_text=att, text_after=after,
                       vision_attn=va)
    sc = MustDropScorer(global_thr=0.08, individual_thr=0.1, key_ratio=0.08)
    sel = sc.select(sig)
    for s in range(len(counts)):
        rows = [t for t in range(text_counts[s]) if bool(after[s][t])]
        assert kept(sel, s) == ref_filter(att[s], rows, va[s], original[s], 0.08, 0.1, 0.08, budget[s])


# ----------------------------------------------------------------------------- preset


def test_preset_stages_thresholds_and_options():
    plan = build_plan("mustdrop", 64)
    assert [(st.layer, st.mode, st.scorer.name) for st in plan] == [
        (0, "merge", "mustdrop_merge"), (3, "select", "mustdrop"), (7, "select", "mustdrop"),
        (11, "select", "mustdrop"), (15, "select", "mustdrop")]
    assert plan[0].keep == 1.0 and all(st.keep == 64 for st in plan[1:])
    assert (plan[1].scorer.global_thr, plan[1].scorer.individual_thr, plan[1].scorer.key_ratio) == (0.011, 0.01, 0.08)
    assert (plan[0].scorer.threshold, plan[0].scorer.window) == (0.8, 3)
    assert mustdrop_thresholds(128) == (0.0012, 0.001) and mustdrop_thresholds(192) == (0.001, 0.001)
    assert mustdrop_thresholds(1.0) == (0.001, 0.001) and mustdrop_thresholds(0.1) == (0.011, 0.01)
    plan = build_plan("mustdrop", 64, layers=(1, 2), global_thr=0.2)
    assert [st.layer for st in plan] == [0, 1, 2] and plan[1].scorer.global_thr == 0.2
    assert plan[1].scorer.individual_thr == 0.01
    with pytest.raises(PruningConfigError):
        build_plan("mustdrop", 64, layers=(0, 2))
    with pytest.raises(PruningConfigError):
        build_plan("mustdrop", 64, key_ratio=2.0)


# ----------------------------------------------------------------------------- end to end

SMALL = dict(layers=(1, 2, 3), merge_threshold=0.03, global_thr=0.03, individual_thr=0.05)


class _RecMerge(MustDropMergeScorer):
    def __init__(self, seen, **kw):
        super().__init__(**kw)
        self.seen = seen

    def select(self, sig):
        sel = super().select(sig)
        self.seen.append(("merge", sig, sel))
        return sel


class _RecFilter(MustDropScorer):
    def __init__(self, seen, **kw):
        super().__init__(**kw)
        self.seen = seen

    def select(self, sig):
        sel = super().select(sig)
        self.seen.append(("filter", sig, sel))
        return sel


def _inputs(arch):
    if arch == "qwen2_vl_images":
        model = get_model("qwen2_vl")
        items = [[("image", (1, 12, 12))], [("image", (1, 6, 12)), ("image", (1, 6, 6))], []]
        return model, tm.qwen_inputs(model, items, pad_side="left")
    model = get_model(arch)
    return model, get_inputs(arch, model)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl_images"])
def test_kept_sets_match_reference_on_the_recorded_signals(arch):
    model, inputs = _inputs(arch)
    seen = []
    plan = [vtoken.Stage(0, _RecMerge(seen, threshold=0.03), 1.0, mode="merge")] + [
        vtoken.Stage(L, _RecFilter(seen, global_thr=0.03, individual_thr=0.05), 0.5) for L in (1, 2, 3)]
    with vtoken.apply_pruning(model, plan=plan) as h:
        with torch.no_grad():
            model(**inputs)
        stats = h.stats
    assert [k for k, _, _ in seen] == ["merge", "filter", "filter", "filter"]
    merged_any = False
    for (kind, sig, sel), st in zip(seen, stats.stages):
        for s in range(sig.num_segments):
            c = int(sig.counts[s])
            if kind == "merge":
                ref_keep, _ = ref_merge(sig.hidden[s, :c], sig.grid[s], 0.03)
                merged_any |= len(ref_keep) < c
            else:
                T = int(sig.text_mask[s].sum())
                rows = [t for t in range(T) if bool(sig.text_after[s, t])]
                ref_keep = ref_filter(sig.attn_text[s, :, :T, :c], rows, sig.vision_attn[s, :c], int(sig.original[s]),
                                      0.03, 0.05, 0.08, int(sig.budget[s]))
            assert kept(sel, s) == ref_keep
        assert sum(sum(c) for c in st.counts) == int(sel.keep.sum())
    assert merged_any


def _run(model, inputs):
    with vtoken.apply_pruning(model, method="mustdrop", keep=0.5, **SMALL) as h:
        with torch.no_grad():
            out = model(**inputs).logits
        return out, h.stats


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl_images"])
def test_batch_equals_each_sample_alone(arch):
    model, inputs = _inputs(arch)
    out, stats = _run(model, inputs)
    assert stats.stages[0].diagnostics["mustdrop_merged_windows"].sum() > 0
    slot = last_slot(stats, inputs)
    for b in range(inputs["input_ids"].shape[0]):
        single = slice_sample(inputs, b, model)
        one, one_stats = _run(model, single)
        torch.testing.assert_close(out[b, slot[b]], one[0, -1], rtol=1e-4, atol=1e-4)
        if one_stats is None:  # a sample without images: nothing to prune
            continue
        for st_b, st_1 in zip(stats.stages, one_stats.stages):
            assert torch.equal(st_b.kept[b], st_1.kept[0])


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl_images"])
def test_cache_equals_no_cache(arch):
    model, inputs = _inputs(arch)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)
    with vtoken.apply_pruning(model, method="mustdrop", keep=0.5, **SMALL) as h:
        a = model.generate(**inputs, use_cache=True, **gen)
        assert h.stats.stages[0].diagnostics["mustdrop_merged_windows"].sum() > 0
        b = model.generate(**inputs, use_cache=False, **gen)
    assert torch.equal(a, b)


def test_clear_errors_where_the_signals_do_not_exist():
    # Qwen2.5-VL: encoder attention not mapped to LLM tokens -> refused at attach, nothing attached
    model = get_model("qwen2_5_vl")
    with pytest.raises(PruningConfigError, match="vision-encoder attention"):
        vtoken.apply_pruning(model, method="mustdrop", keep=0.5, **SMALL)
    assert vtoken.hooks.handle_of(model) is None
    # LLaVA-NeXT: no encoder attention mapping (nor a token grid for its anyres tiles) -> refused at attach
    model = get_model("llava_next")
    with pytest.raises(PruningConfigError, match="vision-encoder attention"):
        vtoken.apply_pruning(model, method="mustdrop", keep=0.5, **SMALL)
    assert vtoken.hooks.handle_of(model) is None
    # a segment without a grid reaching the merge stage: a clear error (hand-built; no adapter with an
    # encoder-attention mapping lacks grids today)
    sig = make_signals([4], [4], hidden=[torch.randn(4, 8)], grid=[None])
    with pytest.raises(PruningConfigError, match="grid"):
        MustDropMergeScorer().select(sig)
