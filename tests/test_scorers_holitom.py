"""HoliTom (Shao et al., arXiv:2505.21334): the pre-LLM stage's kept set and merge assignment equal a
plain-loop reference written from the authors' released selection code (github.com/cokeshao/HoliTom
at b1d1412, holitom/llava_arch.py: ``select_static_windows``, ``get_static_dynamic_features``,
``merge_tokens_by_attention_density``, ``merge_tokens_by_density``, ``cluster_dpc_knn``,
``merge_tokens_by_clustering``), with the scorer's documented salience (each token's dot product
with its frame's mean feature) in place of the encoder attention, on hand-built videos with known
static scenes and on random ones; images refused; the preset; end to end on tiny Qwen2-VL,
Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision with videos: exact budgets per stage, batch == each
sample alone, cache on / off equal."""

import itertools
import math

import pytest
import torch

import tiny_models as tm
import vtoken
from conftest import SUPPRESS, count_syncs, get_model, slice_sample
from vtoken.errors import PruningConfigError
from vtoken.scorers import FastVScorer, HoliTomScorer
from vtoken.scorers.holitom import static_windows
from vtoken.scorers.testing import make_signals, permute_slots
from test_scorers_e2e import last_slot

TAU, K = 0.8, 7


def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def reference_windows(x, tau=TAU, max_window=1024):
    """The released ``select_static_windows`` in plain loops: (windows, tokens saved)."""
    T, N = x.shape[0], x.shape[1]
    still = [[cos(x[f, p], x[f + 1, p]) > tau for p in range(N)] for f in range(T - 1)]

    def pruned(s, e):  # static tokens of frames s..e times (e - s)
        if e <= s:
            return 0
        return sum(all(still[f][p] for f in range(s, e)) for p in range(N)) * (e - s)

    dp, prev = [0.0] * T, [0] * T
    for i in range(T):
        max_val = dp[i - 1] if i > 0 else 0
        best_j = i
        for window_size in range(2, min(i + 1, max_window) + 1):
            j = i - window_size
            val = (dp[j] if j >= 0 else 0) + pruned(j + 1, i)
            if val > max_val:
                max_val, best_j = val, j + 1
        dp[i], prev[i] = max_val, best_j
    out, i = [], T - 1
    while i >= 0:
        out.append((prev[i], i))
        i = prev[i] - 1
    return out[::-1], dp[-1], still, pruned


def reference_dpc(feats, centres, k):
    """``cluster_dpc_knn`` + the nearest-centre assignment of ``merge_tokens_by_clustering`` in
    plain loops, without the released random noise (ties to the lower index)."""
    M, D = len(feats), len(feats[0])
    dist = [[math.sqrt(sum((feats[a][d] - feats[b][d]) ** 2 for d in range(D))) / math.sqrt(D) for b in range(M)]
            for a in range(M)]
    dmax = max(max(r) for r in dist)
    dens = [math.exp(-sum(v ** 2 for v in sorted(dist[a])[:k]) / k) for a in range(M)]
    score = []
    for a in range(M):
        higher = [dist[a][b] for b in range(M) if dens[b] > dens[a]]
        score.append((min(higher) if higher else dmax) * dens[a])
    cent = sorted(sorted(range(M), key=lambda a: (-score[a], a))[:centres])
    assign = [min(range(len(cent)), key=lambda c: (dist[a][cent[c]], c)) for a in range(M)]
    return cent, assign


def reference_holitom(x, retain, tau=TAU, k=K, D=0.0):
    """The released pre-LLM rule on x (T, N, Dm) float64: (kept (frame, pos) set, merge map
    {(frame, pos): (frame, pos)})."""
    T, N, Dm = x.shape
    sal = [[float(x[f, p] @ x[f].mean(0)) for p in range(N)] for f in range(T)]
    windows, saved, still, _ = reference_windows(x, tau)
    total = T * N
    r = min(retain / ((total - saved) / total), 1)
    kept, merge = set(), {}
    for start, end in windows:
        if start == end:
            static = [False] * N
        else:
            static = [all(still[f][p] for f in range(start, end)) for p in range(N)]
        dyn = [p for p in range(N) if not static[p]]
        st = [p for p in range(N) if static[p]]
        share = math.ceil(len(dyn) * r)
        dominant = round(share * (1 - D))
        contextual = share - dominant
        for f in range(start, end + 1):
            top = sorted(dyn, key=lambda p: (-sal[f][p], p))[:dominant]
            kept |= {(f, p) for p in top}
            if contextual > 0:
                rest = [p for p in dyn if p not in top]
                cent, assign = reference_dpc([x[f, p].tolist() for p in rest], contextual, min(k, contextual))
                kept |= {(f, rest[c]) for c in cent}
                for a, p in enumerate(rest):
                    if a not in cent:
                        merge[(f, p)] = (f, rest[cent[assign[a]]])
        clusters = round(len(st) * r)
        if clusters > 0:
            feats = [x[start:end + 1, p].mean(0).tolist() for p in st]
            cent, assign = reference_dpc(feats, clusters, min(k, clusters))
            kept |= {(start, st[c]) for c in cent}
            for a, p in enumerate(st):
                for f in range(start, end + 1):
                    if not (f == start and a in cent):
                        merge[(f, p)] = (start, st[cent[assign[a]]])
    return kept, merge


def run_scorer(x, budget, scorer=HoliTomScorer, **kw):
    """``scorer(**kw)`` on one video x (T, N, D): (kept (frame, pos) set, merge map, Selection)."""
    T, N, Dm = x.shape
    sig = make_signals([T * N], [budget], grid=[(T, 1, N)], hidden=[x.reshape(T * N, Dm).float()], kind=["video"])
    sel = scorer(**kw).select(sig)
    kept = {(j // N, j % N) for j in torch.nonzero(sel.keep[0]).flatten().tolist()}
    merge = {(j // N, j % N): (int(t) // N, int(t) % N) for j, t in enumerate(sel.merge_into[0].tolist()) if t >= 0}
    return kept, merge, sel


def scenes(T, N, Dm, changes, moving, noise, seed):
    """Frames repeating a scene (plus small noise); a new scene at each frame in ``changes``;
    the positions in ``moving`` get fresh features every frame (dynamic tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(T, N, Dm, dtype=torch.float64)
    base = torch.randn(N, Dm, generator=g, dtype=torch.float64)
    for f in range(T):
        if f in changes:
            base = torch.randn(N, Dm, generator=g, dtype=torch.float64)
        x[f] = base + noise * torch.randn(N, Dm, generator=g, dtype=torch.float64)
        for p in moving:
            x[f, p] = torch.randn(Dm, generator=g, dtype=torch.float64)
    return x.float().double()


def check_against_reference(x, budget, D=0.0):
    """Exact equality where the released count is the budget; otherwise the documented fill / trim
    by salience. Returns whether the case was exact."""
    T, N, _ = x.shape
    ref_kept, ref_merge = reference_holitom(x, budget / (T * N), D=D)
    kept, merge, _ = run_scorer(x, budget, D=D)
    sal = {(f, p): float(x[f, p] @ x[f].mean(0)) for f in range(T) for p in range(N)}
    return check_fill_trim(kept, merge, ref_kept, ref_merge, sal, budget, N)


def check_fill_trim(kept, merge, ref_kept, ref_merge, sal, budget, N):
    """The scorer's (kept, merge) against the released (ref_kept, ref_merge): equal where the released
    count is the budget; else the released set filled with the most salient others / trimmed to its
    most salient (ties to the lower flat index), merges kept where their target is. Returns whether
    the case was exact."""
    assert len(kept) == budget
    if len(ref_kept) == budget:
        assert kept == ref_kept
        assert merge == ref_merge
        return True
    if len(ref_kept) < budget:
        assert ref_kept <= kept
        others = sorted((q for q in sal if q not in ref_kept), key=lambda q: (-sal[q], q[0] * N + q[1]))
        assert kept == ref_kept | set(others[:budget - len(ref_kept)])
    else:
        ranked = sorted(ref_kept, key=lambda q: (-sal[q], q[0] * N + q[1]))
        assert kept == set(ranked[:budget])
    # merges follow the reference wherever their target is kept
    assert merge == {a: b for a, b in ref_merge.items() if b in kept and a not in kept}
    return False


def test_holitom_windows_equal_released_dp_and_are_optimal():
    """The DP's windows equal the released transcription, and no segmentation saves more
    (brute force over every segmentation of up to 7 frames)."""
    for seed, (T, changes) in enumerate([(5, {2}), (6, {3}), (7, {1, 4}), (6, set()), (7, set(range(7)))]):
        x = scenes(T, 6, 4, changes, moving={5}, noise=0.05, seed=seed)
        ref_windows, ref_saved, _, pruned = reference_windows(x)
        z = torch.nn.functional.normalize(x, dim=-1)
        got, saved = static_windows((z[:-1] * z[1:]).sum(-1) > TAU)
        assert got == ref_windows and saved == ref_saved
        best = 0
        for cuts in itertools.product([0, 1], repeat=T - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [T]
            best = max(best, sum(pruned(a, b - 1) for a, b in zip(bounds, bounds[1:])))
        assert saved == best


def test_holitom_hand_built_scenes():
    """Two scenes of 4 frames, 12 tokens a frame; positions 9..11 move every frame. The windows
    are the scenes; each scene's 9 static tokens are merged into tokens of its first frame
    (every frame's copy of a static token goes to the same target); the moving tokens are kept
    per frame by salience or dropped."""
    T, N = 8, 12
    x = scenes(T, N, 6, changes={0, 4}, moving={9, 10, 11}, noise=0.01, seed=1)
    windows, saved, _, _ = reference_windows(x)
    assert windows == [(0, 3), (4, 7)] and saved == 2 * 9 * 3
    budget = 14
    kept, merge, _ = run_scorer(x, budget)
    assert check_against_reference(x, budget)
    # retain 14/96, raised by the saving: r' = (14/96) / (42/96) = 1/3 -> round(9/3) = 3 static
    # clusters a scene and ceil(3/3) = 1 moving token a frame: 2 * 3 + 8 * 1 = 14, the budget
    assert sorted(f for f, p in kept if p >= 9) == list(range(T))
    assert sorted(f for f, p in kept if p < 9) == [0, 0, 0, 4, 4, 4]
    for (f, p), (tf, tp) in merge.items():
        if p < 9:
            assert tf == (0 if f < 4 else 4) and tp < 9
            assert merge.get((tf + 1, p)) == (tf, tp) or (tf + 1, p) in kept


CASES = [  # (T, N, changes, moving, noise)
    (6, 8, {3}, {0, 5}, 0.05),
    (8, 9, {2, 5}, {1, 4, 7}, 0.02),
    (4, 12, set(), {3}, 0.1),
    (5, 6, set(range(5)), set(), 0.5),
    (8, 6, {4}, set(), 0.01),
]


@pytest.mark.parametrize("T,N,changes,moving,noise", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_holitom_equals_released_rule(T, N, changes, moving, noise, seed):
    x = scenes(T, N, 5, changes, moving, noise, seed)
    exact = [check_against_reference(x, b) for b in range(1, T * N)]
    assert any(exact), "no budget hit the released count exactly"


@pytest.mark.parametrize("seed", [0, 1])
def test_holitom_contextual_tokens_with_D(seed):
    """D > 0: part of each frame's share are DPC-kNN centres of its other dynamic tokens, merged."""
    x = scenes(6, 10, 5, {3}, {0, 2, 4, 6, 8}, 0.05, seed)
    exact = [check_against_reference(x, b, D=0.5) for b in range(4, 30)]
    assert any(exact)


def test_holitom_images_refused_and_video_kinds():
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)]
    sig = make_signals([16, 16], [4, 16], grid=[(1, 4, 4), (1, 4, 4)], hidden=h, kind=["video", "image"])
    sel = HoliTomScorer().select(sig)  # an image kept whole is fine; a one-frame video is pruned
    assert sel.keep.sum(1).tolist() == [4, 16]
    sig = make_signals([16], [4], grid=[(1, 4, 4)], hidden=h[:1], kind=["image"])
    with pytest.raises(PruningConfigError, match="not supported"):
        HoliTomScorer().select(sig)


def test_holitom_preset():
    plan = vtoken.build_plan("holitom", 0.1)
    assert [(st.layer, st.keep, st.mode) for st in plan] == [(0, 0.1, "merge"), (18, 0.05, "merge")]
    assert isinstance(plan[0].scorer, HoliTomScorer) and isinstance(plan[1].scorer, FastVScorer)
    assert [st.keep for st in vtoken.build_plan("holitom", 64, r=0.25)] == [64, 48]
    assert len(vtoken.build_plan("holitom", 64, layers=())) == 1
    with pytest.raises(PruningConfigError):
        vtoken.build_plan("holitom", 64, D=2.0)


# ---------------------------------------------------------------- end to end
# between the segment sizes: Qwen2/2.5-VL's videos (16 tokens each) and OneVision's (17) are pruned;
# on Qwen3-VL sample 0 keeps its four 4-token groups whole while sample 1's two 8-token groups are
# pruned, and the batch keeps its length (the deepstack features follow sample 1's moved tokens)
KEEP = 6


def video_batch(arch, model):
    if arch == "llava_onevision":
        return tm.onevision_video_inputs(model, [4, 4], pad_side="left")
    return tm.qwen_inputs(model, [[("video", (4, 4, 4))], [("video", (2, 4, 8))], []], pad_side="left")


def one_sample(arch, model, inputs, b):
    if arch != "llava_onevision":
        return slice_sample(inputs, b, model)
    m = inputs["attention_mask"][b].bool()
    return dict(input_ids=inputs["input_ids"][b][m][None], attention_mask=torch.ones(1, int(m.sum()), dtype=torch.long),
                pixel_values_videos=inputs["pixel_values_videos"][b:b + 1])




def run(model, inputs):
    with vtoken.apply_pruning(model, method="holitom", keep=KEEP, layers=2) as h, torch.no_grad():
        return model(**inputs).logits, h.stats


ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"]


def check_video_budgets_and_batch(arch, run, keep, second):
    """``run(model, inputs) -> (logits, stats)`` of a two-stage video method on ``video_batch``:
    exact counts per stage (``keep``, then ``second``), every video one segment (Qwen3-VL: one per
    temporal group), batch == each sample alone (logits and kept sets)."""
    model = get_model(arch)
    inputs = video_batch(arch, model)
    out, stats = run(model, inputs)
    assert [st.layer for st in stats.stages] == [0, 2]
    for b in range(inputs["input_ids"].shape[0]):
        for seg, c0, c1 in zip(stats.segments[b], stats.stages[0].counts[b], stats.stages[1].counts[b]):
            assert seg.kind == "video"
            assert c0 == min(keep, seg.count) and c1 == min(second, c0)
            if arch != "qwen3_vl":
                assert seg.grid is not None and seg.grid[0] > 1  # the whole video is one segment
    last = last_slot(stats, inputs)
    for b in range(inputs["input_ids"].shape[0]):
        one, one_stats = run(model, one_sample(arch, model, inputs, b))
        torch.testing.assert_close(out[b, last[b]], one[0, -1], rtol=1e-4, atol=1e-4)
        if stats.segments[b]:
            for st_b, st_1 in zip(stats.stages, one_stats.stages):
                assert torch.equal(st_b.kept[b], st_1.kept[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_holitom_end_to_end_budgets_and_batch(arch):
    check_video_budgets_and_batch(arch, run, KEEP, max(1, round(KEEP * 0.5)))


def check_video_cache_on_off(arch, method, **options):
    """Greedy generation on ``video_batch`` under ``method``: the same tokens with and without cache."""
    model = get_model(arch)
    inputs = video_batch(arch, model)
    with vtoken.apply_pruning(model, method=method, keep=KEEP, layers=2, **options):
        with_cache = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)
        without = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False, suppress_tokens=SUPPRESS)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("arch", ARCHS)
def test_holitom_generate_cache_on_off_equal(arch):
    check_video_cache_on_off(arch, "holitom")


def test_holitom_end_to_end_kept_set_is_the_scorer_on_the_llm_inputs():
    """Qwen2-VL, one 8-frame video: the first stage keeps what the scorer keeps on the features
    entering the LLM (grid (8, 2, 2)), and where the released count is the budget, the released set."""
    model = get_model("qwen2_vl")
    inputs = tm.qwen_inputs(model, [[("video", (8, 4, 4))]])
    x = tm.llm_inputs_at(model, inputs).double().reshape(8, 4, -1)
    for budget in (4, 8, 12):
        with vtoken.apply_pruning(model, method="holitom", keep=budget, layers=()) as h, torch.no_grad():
            model(**inputs)
            kept = {(j // 4, j % 4) for j in h.stats.stages[0].kept[0].tolist()}
        assert kept == run_scorer(x, budget)[0]
        ref, _ = reference_holitom(x, budget / 32)
        if len(ref) == budget:
            assert kept == ref


@pytest.mark.parametrize("method", ["holitom", "flashvid"])
def test_video_methods_refuse_images_end_to_end(method):
    model = get_model("qwen2_vl")
    inputs = tm.qwen_inputs(model, [[("image", (1, 8, 8))]])
    with pytest.raises(PruningConfigError, match="not supported"):
        with vtoken.apply_pruning(model, method=method, keep=KEEP, layers=2), torch.no_grad():
            model(**inputs)


def test_holitom_qwen3_vl_groups_are_one_video():
    """Qwen3-VL makes each temporal group a segment: the rule runs over the whole video (windows
    across the groups) and each group keeps its budget: the rule's tokens of that group first,
    then its others, by salience; merges stay inside a group."""
    model = get_model("qwen3_vl")
    inputs = tm.qwen_inputs(model, [[("video", (6, 4, 4))]])
    T, N = 6, 4
    pix = inputs["pixel_values_videos"].view(T, 16, -1)  # two scenes of 3 identical temporal groups
    pix[1:3] = pix[0]
    pix[4:6] = pix[3]
    x = tm.llm_inputs_at(model, inputs).double().reshape(T, N, -1)
    sal = {(f, p): float(x[f, p] @ x[f].mean(0)) for f in range(T) for p in range(N)}
    for budget in (1, 2, 3):
        with vtoken.apply_pruning(model, method="holitom", keep=budget, layers=()) as h, torch.no_grad():
            model(**inputs)
            stats = h.stats
        assert [seg.grid for seg in stats.segments[0]] == [(1, 2, 2)] * T
        ref, _ = reference_holitom(x, budget / N)
        assert reference_windows(x)[0] == [(0, 2), (3, 5)]
        # the scenes' static clusters sit in their first groups, unlike a per-group top of the salience
        assert any(sorted(p for f, p in ref if f == g) != sorted(range(N), key=lambda p: (-sal[(g, p)], p))[:budget]
                   for g in (0, 3)) or budget == N
        # kept[0]: the sample's kept visual tokens, numbered over its visual tokens (frame-major)
        got = [sorted(j % N for j in stats.stages[0].kept[0].tolist() if j // N == f) for f in range(T)]
        for f in range(T):
            ranked = sorted(range(N), key=lambda p: ((f, p) not in ref, -sal[(f, p)], p))
            assert got[f] == sorted(ranked[:budget])


# (T, N, changes, moving, noise, seed, budget): ragged frame counts and sizes, static and random videos
# (budgets above 3 tokens a frame give FlashVID's TSTM and clustering tokens to place)
BATCH = [(8, 9, {2, 5}, {1, 4, 7}, 0.02, 0, 32), (4, 12, set(), {3}, 0.1, 1, 20),
         (5, 6, set(range(5)), set(), 0.5, 2, 12), (8, 6, {4}, set(), 0.01, 3, 7),
         (6, 10, {3}, {0, 2, 4, 6, 8}, 0.05, 4, 36)]


def batch_signals(cases, permute=None, groups=0):
    """Signals of one video per case (``grid`` (T, 1, N)), then ``groups`` videos of 3 one-frame
    temporal-group segments each (Qwen3-VL's layout: ``sig.video``)."""
    xs = [scenes(T, N, 5, ch, mv, noise, seed) for T, N, ch, mv, noise, seed, _ in cases]
    hidden = [x.reshape(-1, 5).float() for x in xs]
    counts, budgets = [x.shape[0] * x.shape[1] for x in xs], [c[-1] for c in cases]
    grids, video, sample = [(x.shape[0], 1, x.shape[1]) for x in xs], [None] * len(xs), list(range(len(xs)))
    for v in range(groups):
        x = scenes(3, 8, 5, set(), {1, 5}, 0.05, 10 + v)
        hidden += [x[f].float() for f in range(3)]
        counts, budgets, grids = counts + [8] * 3, budgets + [5, 6, 4], grids + [(1, 2, 4)] * 3
        video, sample = video + [v] * 3, sample + [len(xs) + v] * 3
    sig = make_signals(counts, budgets, grid=grids, hidden=hidden, video=video, sample=sample,
                       kind=["video"] * len(counts))
    if permute is not None:  # real slots scattered among padding; positions by ``index``
        permute_slots(sig, permute)
    return xs, sig


def by_index(sel, sig, s):
    """Row s of a Selection by original index: (kept set, merges index -> index, scores)."""
    idx = sig.index[s]
    kept = {int(idx[j]) for j in sel.keep[s].nonzero().flatten().tolist()}
    merge = {int(idx[j]): int(idx[t]) for j, t in enumerate(sel.merge_into[s].tolist()) if t >= 0}
    real = sig.mask[s].nonzero().flatten()
    return kept, merge, sel.scores[s, real[torch.argsort(idx[real])]]


def check_batch_equals_alone(make, permute, reference=None):
    """``make()``'s scorer on videos with different content, frame counts and frame sizes, and two
    Qwen3-VL-style videos of temporal-group segments, in one call: every segment keeps, merges and
    ranks what it does alone (its video alone); ``reference(x, budget)`` checks each video."""
    xs, sig = batch_signals(BATCH, permute, groups=2)
    sel = make().select(sig)
    assert not (sel.keep & ~sig.mask).any()
    for s, (x, case) in enumerate(zip(xs, BATCH)):
        T, N = x.shape[0], x.shape[1]
        one = make_signals([T * N], [case[-1]], grid=[(T, 1, N)], hidden=[x.reshape(-1, 5).float()], kind=["video"])
        got, want = by_index(sel, sig, s), by_index(make().select(one), one, 0)
        assert got[:2] == want[:2] and torch.equal(got[2], want[2]), s
        if reference is not None:
            reference(x, case[-1])
    for v in range(2):  # the group videos: each equal to its video alone
        _, one = batch_signals([], groups=v + 1)
        ref = make().select(one)
        for g in range(3):
            got, want = by_index(sel, sig, len(BATCH) + 3 * v + g), by_index(ref, one, 3 * v + g)
            assert got[:2] == want[:2] and torch.equal(got[2], want[2]), (v, g)


def check_syncs_fixed(make):
    """The host syncs of ``make()``'s call are a fixed number (at most 2): one video or four (and
    group videos), a video of one static window or of many short ones, 4 frames or 24."""
    def syncs(cases, groups=0):
        _, sig = batch_signals(cases, groups=groups)
        return count_syncs(lambda: make().select(sig))

    one, four = syncs(BATCH[:1]), syncs(BATCH[:4], groups=2)
    static = syncs([(24, 6, set(), set(), 0.001, 0, 96)])
    windows = syncs([(24, 6, set(range(0, 24, 2)), {1}, 0.01, 0, 96)])
    few = syncs([(4, 6, set(), {1}, 0.01, 0, 16)])
    assert one == four == static == windows == few <= 2, (one, four, static, windows, few)


@pytest.mark.parametrize("permute", [None, 5])
@pytest.mark.parametrize("D", [0.0, 0.5])
def test_holitom_batch_equals_each_video_alone(permute, D):
    """A batch of videos (and group videos) equals each alone, and holds the released rule."""
    check_batch_equals_alone(lambda: HoliTomScorer(D=D), permute, check_against_reference if D == 0.0 else None)


@pytest.mark.parametrize("D", [0.0, 0.5])
def test_holitom_syncs_do_not_grow_with_batch_windows_or_frames(D):
    check_syncs_fixed(lambda: HoliTomScorer(D=D))
