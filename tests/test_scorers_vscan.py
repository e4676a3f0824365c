"""VScan (Zhang et al., arXiv:2505.22654): the encoder stage's kept set and merge assignment equal a
plain-loop reference written from the authors' released selection code (github.com/Tencent/
SelfEvolvingAgent, VScan/ at 5fe6480: ``window_cls_selection`` and ``token_merging`` in
llava/model/llava_arch.py, ``window_selection`` in qwen/model/qwen2_5_vl_utils.py) on hand-built
and random attention maps; the budget mapping and the preset; end to end on tiny LLaVA,
Qwen2-VL and Qwen3-VL (images): exact budgets per stage, the merge applied, batch == each sample alone, cache
on / off equal."""

import math

import pytest
import torch

import tiny_models as tm
import vtoken
from conftest import SUPPRESS, get_inputs, get_model, slice_sample
from vtoken.errors import PruningConfigError
from vtoken.scorers import PyramidDropScorer, VScanScorer
from vtoken.scorers.testing import make_signals
from vtoken.scorers.vscan import vscan_budgets
from test_scorers_e2e import last_slot


def order_desc(values):
    """Indices by decreasing value, ties to the lower index (the scorer's documented tie rule)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def reference_local_llava(attn, H, W, count, window):
    """The LLaVA variant: the top ``count // windows`` of every window (windows row-major)."""
    nh, nw = H // window, W // window
    per = count // (nh * nw)
    out = []
    for i in range(nh):
        for j in range(nw):
            cells = [(i * window + dy) * W + j * window + dx for dy in range(window) for dx in range(window)]
            ranked = sorted(cells, key=lambda c: (-attn[c], c))
            out += ranked[:per]
    return out


def reference_local_qwen(attn, H, W, count, window):
    """The Qwen variant: walk tokens by decreasing attention, take one while its window (edge rows
    and columns folded into the last window) holds fewer than ceil(count / windows)."""
    nh, nw = max(H // window, 1), max(W // window, 1)
    limit = math.ceil(count / (nh * nw))
    counter = {}
    out = []
    for idx in order_desc(attn):
        x, y = (idx // W) // window, (idx % W) // window
        x, y = min(x, nh - 1), min(y, nw - 1)
        if counter.get((x, y), 0) < limit:
            counter[(x, y)] = counter.get((x, y), 0) + 1
            out.append(idx)
        if len(out) >= count:
            break
    return out


def reference_vscan(attn, feats, H, W, T, window, local=None):
    """Kept set and merge assignment of the released encoder stage: local scan, then the global
    scan on the attention with the local tokens zeroed, then every other token to its most
    similar kept token (cosine, first maximum in index order)."""
    attn = [float(a) for a in attn]
    n_local = int(T * 0.5)
    local = (local or reference_local_qwen)(attn, H, W, n_local, window)
    masked = [0.0 if i in set(local) else a for i, a in enumerate(attn)]
    glob = order_desc(masked)[: T - n_local]
    kept = sorted(set(local) | set(glob))
    assign = {}
    for i in range(H * W):
        if i in kept:
            continue
        sims = [float(torch.nn.functional.cosine_similarity(feats[i], feats[k], dim=0)) for k in kept]
        assign[i] = kept[max(range(len(kept)), key=lambda j: (sims[j], -j))]
    return set(kept), assign


def run_scorer(attn, feats, H, W, T, window, **kw):
    sig = make_signals([H * W], [T], grid=[(1, H, W)], vision_attn=[attn], hidden=[feats])
    sel = VScanScorer(window=window, **kw).select(sig)
    kept = set(torch.nonzero(sel.keep[0]).flatten().tolist())
    assign = {i: int(sel.merge_into[0, i]) for i in range(H * W) if i not in kept}
    return kept, assign, sel


def random_case(H, W, seed, dim=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(H * W, generator=g, dtype=torch.float64) + 0.01, torch.randn(H * W, dim, generator=g)


@pytest.mark.parametrize("T", [64, 96, 128, 192])
@pytest.mark.parametrize("seed", [0, 1])
def test_vscan_llava_grid_equals_released_llava_variant(T, seed):
    """24 x 24 grid, window 6 (16 windows), local = T / 2 a multiple of 16: the released LLaVA
    code's top-k per window, then the global top of the rest."""
    attn, feats = random_case(24, 24, seed)
    ref_kept, ref_assign = reference_vscan(attn, feats, 24, 24, T, 6, local=reference_local_llava)
    kept, assign, _ = run_scorer(attn, feats, 24, 24, T, 6)
    assert len(kept) == T
    assert kept == ref_kept
    assert assign == ref_assign


@pytest.mark.parametrize("H,W,T,window", [(24, 24, 100, 6), (10, 14, 30, 4), (9, 7, 11, 4), (3, 5, 6, 4),
                                          (12, 12, 7, 6), (8, 8, 64, 4)])
@pytest.mark.parametrize("seed", [0, 3])
def test_vscan_general_grids_equal_released_qwen_variant(H, W, T, window, seed):
    """Any grid (edge rows / columns in the last window, a grid smaller than a window, a budget
    not a multiple of the windows, the whole image): the released Qwen variant's capped walk."""
    attn, feats = random_case(H, W, seed)
    ref_kept, ref_assign = reference_vscan(attn, feats, H, W, T, window)
    kept, assign, _ = run_scorer(attn, feats, H, W, T, window)
    assert len(kept) == T
    assert kept == ref_kept
    assert assign == ref_assign


def test_vscan_hand_built_local_and_global():
    """An 8 x 8 grid in four 4 x 4 windows; all the attention sits in the top-left window, with a
    known order. Budget 8: the global scan alone would keep 8 top-left tokens; VScan keeps the
    top local 4 = one per window (each window's own maximum), then the 4 strongest others, all
    top-left. Ties (equal attention) go to the lower index."""
    H = W = 8
    attn = torch.full((H * W,), 0.01, dtype=torch.float64)
    top_left = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17]
    for rank, i in enumerate(top_left):
        attn[i] = 1.0 - 0.05 * rank
    attn[4 * W + 7] = 0.5  # row 4, column 7: the bottom-right window
    attn[7 * W + 0] = 0.3  # row 7, column 0: the bottom-left window
    # top-right window: all tied at 0.01 -> its lowest index, token 4
    feats = torch.eye(H * W)[:, :16] + 0.0
    kept, _, _ = run_scorer(attn, feats, H, W, 8, 4)
    assert kept == {0, 4, 39, 56} | {1, 2, 3, 8}


def test_vscan_merge_assignment_and_unknown_grid():
    """Merge targets are the most similar kept token; a segment without a grid is one window
    (the two scans are the top of the attention); a video segment too."""
    g = torch.Generator().manual_seed(5)
    attn = torch.rand(20, generator=g)
    feats = torch.randn(20, 6, generator=g)
    sig = make_signals([20, 20, 16], [5, 5, 4], grid=[None, (2, 2, 5), (1, 4, 4)],
                       vision_attn=[attn, attn, attn[:16]], hidden=[feats, feats, feats[:16]])
    sel = VScanScorer().select(sig)
    top5 = set(order_desc(attn.tolist())[:5])
    for s in (0, 1):
        assert set(torch.nonzero(sel.keep[s]).flatten().tolist()) == top5
    assert sel.keep.sum(1).tolist() == [5, 5, 4]
    z = torch.nn.functional.normalize(feats, dim=-1)
    kept = sorted(top5)
    for i in range(20):
        if i in top5:
            assert int(sel.merge_into[0, i]) == -1
        else:
            assert int(sel.merge_into[0, i]) == kept[int((z[i] @ z[kept].T).argmax())]


def test_vscan_budgets_and_plan():
    assert vscan_budgets(64) == (96, 32)
    assert vscan_budgets(192) == (288, 96)
    assert vscan_budgets(0.111) == pytest.approx((0.1665, 0.0555))
    assert vscan_budgets(0.9) == (1.0, 0.45)
    # final count (vtoken eval's "Retain N"): the middle stage keeps N, the encoder 3 N (96 : 32)
    assert vscan_budgets(64, budget="final") == (192, 64)
    assert vscan_budgets(192, budget="final") == (576, 192)
    assert vscan_budgets(0.25, budget="final") == (0.75, 0.25)
    assert vscan_budgets(0.5, budget="final") == (1.0, 0.5)
    from vtoken.methods import budget_count_options
    assert budget_count_options("vscan", "final") == {"budget": "final"}
    with pytest.raises(PruningConfigError, match="'equivalent' or 'final'"):
        vscan_budgets(64, budget="mean")
    plan = vtoken.build_plan("vscan", 64)
    assert [(st.layer, st.keep, st.mode) for st in plan] == [(0, 96, "merge"), (16, 32, "select")]
    assert isinstance(plan[0].scorer, VScanScorer) and isinstance(plan[1].scorer, PyramidDropScorer)
    assert [st.layer for st in vtoken.build_plan("vscan", 64, layers=14)] == [0, 14]
    with pytest.raises(PruningConfigError):
        vtoken.build_plan("vscan", 64, window=0)
    with pytest.raises(PruningConfigError):
        vtoken.build_plan("vscan", 64, scale=(0.5, 1.5))
    spec = vtoken.get_method("vscan") if hasattr(vtoken, "get_method") else None
    if spec is not None:
        assert "5fe6480" in spec.released_code


# ---------------------------------------------------------------- end to end
KEEP = 8


def qwen_images(model):
    items = [[("image", (1, 8, 8))], [("image", (1, 4, 8)), ("image", (1, 4, 4))], []]
    return tm.qwen_inputs(model, items, pad_side="left")


def model_and_inputs(arch):
    model = get_model(arch)
    return model, (qwen_images(model) if arch.startswith("qwen") else get_inputs(arch, model))




def run(model, inputs, **options):
    with vtoken.apply_pruning(model, method="vscan", keep=KEEP, layers=2, **options) as h, torch.no_grad():
        out = model(**inputs).logits
        return out, h.stats


E2E = ["llava", "qwen2_vl", "qwen3_vl"]  # the adapters with vision-encoder attention for images


@pytest.mark.parametrize("arch", E2E)
def test_vscan_end_to_end_budgets_merge_batch(arch):
    # Qwen: the first stage (12) keeps the two images of sample 1 whole and prunes sample 0, so the
    # batch keeps its length while sample 0's tokens move (Qwen3-VL's deepstack follows them)
    model, inputs = model_and_inputs(arch)
    out, stats = run(model, inputs)
    first, second = vscan_budgets(KEEP)
    assert [st.layer for st in stats.stages] == [0, 2]
    for b in range(inputs["input_ids"].shape[0]):
        for seg, c0, c1 in zip(stats.segments[b], stats.stages[0].counts[b], stats.stages[1].counts[b]):
            assert c0 == min(first, seg.count) and c1 == min(second, c0)
    # the merge changes the logits against the same kept set dropped without merging
    plain, stats_sel = run(model, inputs, mode="select")
    assert all(torch.equal(p, q) for p, q in zip(stats.stages[0].kept, stats_sel.stages[0].kept))
    assert not torch.allclose(out, plain)
    # batch == each sample alone (kept sets and the last token's logits)
    last = last_slot(stats, inputs)
    for b in range(inputs["input_ids"].shape[0]):
        one, one_stats = run(model, slice_sample(inputs, b, model))
        torch.testing.assert_close(out[b, last[b]], one[0, -1], rtol=1e-4, atol=1e-4)
        if stats.segments[b]:
            for st_b, st_1 in zip(stats.stages, one_stats.stages):
                assert torch.equal(st_b.kept[b], st_1.kept[0])


@pytest.mark.parametrize("arch", E2E)
def test_vscan_generate_cache_on_off_equal(arch):
    model, inputs = model_and_inputs(arch)
    with vtoken.apply_pruning(model, method="vscan", keep=KEEP, layers=2):
        with_cache = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)
        without = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False, suppress_tokens=SUPPRESS)
    assert torch.equal(with_cache, without)


def test_vscan_refuses_to_prune_video():
    model = get_model("qwen2_vl")
    inputs = tm.qwen_inputs(model, [[("video", (4, 4, 4))]])
    with pytest.raises(PruningConfigError, match="not video"):
        with vtoken.apply_pruning(model, method="vscan", keep=KEEP, layers=2), torch.no_grad():
            model(**inputs)


@pytest.mark.parametrize("arch", ["llava_next", "qwen2_5_vl"])
def test_vscan_refused_without_encoder_attention(arch):
    """Adapters whose encoder attention vtoken does not map to LLM tokens yet refuse it clearly."""
    model = get_model(arch)
    inputs = qwen_images(model) if arch.startswith("qwen") else get_inputs(arch, model)
    with pytest.raises(PruningConfigError, match="vision-encoder attention"):
        with vtoken.apply_pruning(model, method="vscan", keep=KEEP, layers=2), torch.no_grad():
            model(**inputs)
