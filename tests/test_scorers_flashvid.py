"""FlashVID (Fan et al., ICLR 2026, arXiv:2602.08024): the pre-LLM stage's kept set and merge
assignment equal a plain-loop reference written from the authors' released code
(github.com/Fanziyang-v/FlashVID at 038101a: flashvid/utils.py ``flashvid_compression``,
``segment_compression``, ``segment`` / ``additional_segment``, ``spatiotemporal_compression``,
``dpc_knn``; flashvid/token_selection.py ``attn_div_based_token_selection`` and
``attn_div_v2_based_token_selection``), with the scorer's documented attention stand-in (the
softmax over the frame of each token's dot product with the frame's mean / sqrt(D)), on
hand-built videos (test_scorers_holitom's scenes) and random ones; images refused (end to end:
test_scorers_holitom.py); the preset; end to end on tiny Qwen2-VL,
Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision with videos: exact budgets per stage, batch == each
sample alone, cache on / off equal.

FlashVID's ``dpc_knn`` is the same rule as HoliTom's ``cluster_dpc_knn`` (k nearest including the
token itself, density ``exp(-mean squared distance)``, distance to the nearest denser token, the
top ``delta * density`` as centres, each token to its nearest centre), so its plain-loop
reference is shared with tests/test_scorers_holitom.py."""

import math

import pytest
import torch

import tiny_models as tm
import vtoken
from conftest import get_model
from vtoken.errors import PruningConfigError
from vtoken.scorers import FastVScorer, FlashVIDScorer
from test_scorers_holitom import (CASES, KEEP, check_batch_equals_alone, check_fill_trim, check_syncs_fixed,
                                  check_video_budgets_and_batch, check_video_cache_on_off, reference_dpc,
                                  run_scorer as holitom_run_scorer, scenes)
from vtoken.scorers.flashvid import adts
from vtoken.scorers.testing import make_signals


def dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def cos(a, b):
    return dot(a, b) / (math.sqrt(dot(a, a)) * math.sqrt(dot(b, b)))


def mean(rows):
    return [sum(col) / len(rows) for col in zip(*rows)]


def argmax(values):
    """First index of the largest value (torch.argmax's rule)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def attention(X):
    """The documented stand-in for the encoder attention, per frame."""
    out = []
    for frame in X:
        m = mean(frame)
        logits = [dot(t, m) / math.sqrt(len(m)) for t in frame]
        top = max(logits)
        e = [math.exp(v - top) for v in logits]
        out.append([v / sum(e) for v in e])
    return out


def reference_segments(X, threshold, min_segments):
    """``segment`` + ``additional_segment``: segment lengths (zero-length ones dropped)."""
    T = len(X)
    g = [mean(frame) for frame in X]
    sims = [cos(g[f], g[f + 1]) for f in range(T - 1)]
    cuts = [f for f in range(T - 1) if sims[f] < threshold]
    if len(cuts) + 1 < min_segments:
        filled = [1.0 if s < threshold else s for s in sims]
        cuts += sorted(range(T - 1), key=lambda f: (filled[f], f))[:min(min_segments - len(cuts) - 1, T - 1)]
    edges = [-1] + sorted(cuts) + [T - 1]
    return [b - a for a, b in zip(edges, edges[1:]) if b > a]


def reference_adts(frame, att, k, relevance, exclude):
    """One frame of the released calibrated max-min diversity selection: the chosen positions."""
    N = len(frame)
    w = [att[j] * 1e6 * (relevance[j] if relevance is not None else 1.0) for j in range(N)]
    dist = [[(1.0 - cos(frame[i], frame[j])) * w[j] for j in range(N)] for i in range(N)]
    chosen = [argmax([sorted(dist[i][j] for i in range(N))[1] for j in range(N)])]
    for _ in range(1, k):
        md = [min(dist[s][j] for s in chosen) for j in range(N)]
        if exclude:
            for s in chosen:
                md[s] = -1
        chosen.append(argmax(md))
    return set(chosen)


def reference_flashvid(x, K, alpha=0.7, tau=0.8, segment_tau=0.9, min_segments=8, selection="attn_div_v2"):
    """The released pre-LLM rule on x (T, N, D) with K tokens a frame: (kept (frame, pos) set,
    merge map {(frame, pos): (frame, pos)} -- each token folded into a kept token)."""
    X = x.double().tolist()
    T, N = len(X), len(X[0])
    att = attention(X)
    A = math.ceil(K * alpha)
    S = K - A
    kept, merge = set(), {}
    start = 0
    for L in reference_segments(X, segment_tau, min_segments):
        frames = range(start, start + L)
        pooled = [mean(X[f]) for f in frames]
        adts = {}
        for f in frames:
            rel = [sum(dot(X[f][j], p) for p in pooled) / L for j in range(N)] if selection == "attn_div_v2" else None
            adts[f] = reference_adts(X[f], att[f], A, rel, selection == "attn_div")
            kept |= {(f, p) for p in adts[f]}
        if S > 0 and tau < 1.0:
            parent = {}  # merged token -> its parent in the previous frame
            if L > 1:
                best = {(start, n): -1.0 for n in range(N)}
                for f in frames[1:]:
                    for n in range(N):
                        sims = [-1.0 if (n in adts[f] or m in adts[f - 1]) else cos(X[f][n], X[f - 1][m])
                                for m in range(N)]
                        best[(f, n)] = max(sims)
                        parent[(f, n)] = (f - 1, argmax(sims))
                merged = {q for q in best if best[q] > tau}
                if L * N - len(merged) < K * L:
                    soft = max(sorted(best.values(), reverse=True)[L * N - K * L - 1], -1.0 + 1e-6)
                    merged = {q for q in best if best[q] > soft}
                feats = {(f, n): list(X[f][n]) for f in frames for n in range(N)}
                count = {q: 1 for q in feats}
                for f in reversed(frames):
                    for n in range(N):
                        if (f, n) not in merged:
                            feats[(f, n)] = [v / count[(f, n)] for v in feats[(f, n)]]
                            count[(f, n)] = 1
                    for n in range(N):
                        if (f, n) in merged:
                            p = parent[(f, n)]
                            feats[p] = [u + v for u, v in zip(feats[p], feats[(f, n)])]
                            count[p] += 1
                roots = {f: [n for n in range(N) if (f, n) not in merged and n not in adts[f]] for f in frames}
            else:
                merged, feats = set(), {(start, n): X[start][n] for n in range(N)}
                roots = {start: list(range(N))}
            ratio = S * L / sum(len(r) for r in roots.values())
            centre = {}
            for f in frames:
                c = math.ceil(len(roots[f]) * ratio)
                if c > 0 and ratio < 1.0:
                    cent, assign = reference_dpc([feats[(f, n)] for n in roots[f]], c, min(c, 7))
                    for a, n in enumerate(roots[f]):
                        centre[(f, n)] = (f, roots[f][cent[assign[a]]])
                    kept |= {(f, roots[f][i]) for i in cent}
                else:
                    centre.update({(f, n): (f, n) for n in roots[f]})
                    kept |= {(f, n) for n in roots[f]}
            for f in frames:
                for n in range(N):
                    q = (f, n)
                    if q in kept:
                        continue
                    while q in merged:
                        q = parent[q]
                    if q in centre:
                        merge[(f, n)] = centre[q]
        start += L
    return kept, merge, {(f, p): att[f][p] for f in range(T) for p in range(N)}


def run_scorer(x, budget, **kw):
    return holitom_run_scorer(x, budget, scorer=FlashVIDScorer, **kw)


def check_against_reference(x, budget, **kw):
    """Exact equality where the released count is the budget; otherwise the documented fill / trim
    by attention. Returns whether the case was exact."""
    T, N, _ = x.shape
    x = x.float().double()  # what the scorer sees
    ref_kept, ref_merge, att = reference_flashvid(x, min(math.ceil(budget / T), N), **kw)
    kept, merge, _ = run_scorer(x, budget, **kw)
    return check_fill_trim(kept, merge, ref_kept, ref_merge, att, budget, N)


def test_flashvid_hand_built_static_scene():
    """Four frames of one scene (small noise), 8 tokens a frame, token 7 moving; one segment
    (``segment_tau`` = 0.5). alpha = 0.5, K = 4: two ADTS tokens a frame, and every static token of
    a later frame joins the tree of its own copy in frame 0 (cosine ~1 > 0.8), so every later
    static token that is not an ADTS token merges into a frame-0 token; the scorer at budget 16
    is the released set trimmed by attention (the released count rounds the clusters up)."""
    T, N = 4, 8
    x = scenes(T, N, 6, changes={0}, moving={7}, noise=0.01, seed=3)
    kw = dict(alpha=0.5, min_segments=1, segment_tau=0.5)
    assert reference_segments(x.tolist(), 0.5, 1) == [T]
    ref_kept, ref_merge, _ = reference_flashvid(x, 4, **kw)
    for f in range(1, T):
        assert len({p for g, p in ref_kept if g == f and p != 7}) == 2  # its ADTS tokens
        for p in range(7):
            if (f, p) not in ref_kept:
                assert ref_merge[(f, p)][0] == 0  # the static trees' roots are in frame 0
    check_against_reference(x, 16, **kw)
    check_against_reference(x, len(ref_kept) // T * T, **kw)


def test_flashvid_adts_hand_built():
    """One frame e1, e1, e2, e3 (unit vectors), uniform attention. The first token maximises the
    second smallest distance of its column: tokens 0 and 1 have a twin (0), tokens 2 and 3 do not (1
    each), so token 2 (the first maximum); then token 0 (distance 1, the first of 0, 1, 3), then 3;
    the last step sees distance 0 everywhere: ``attn_div`` excludes the chosen tokens and takes token
    1, ``attn_div_v2`` does not and takes token 0 again, keeping 3 tokens."""
    e = torch.eye(3, dtype=torch.float64)
    frame = torch.stack([e[0], e[0], e[1], e[2]])[None]
    att = torch.full((1, 4), 0.25, dtype=torch.float64)
    assert adts(frame, att, 4, exclude=True)[0].tolist() == [True, True, True, True]
    assert adts(frame, att, 4, exclude=False)[0].tolist() == [True, False, True, True]
    assert adts(frame, att, 3, exclude=True)[0].tolist() == [True, False, True, True]
    assert adts(frame, att, 1, exclude=True)[0].tolist() == [False, False, True, False]
    rows = frame[0].tolist()
    assert reference_adts(rows, [0.25] * 4, 4, None, True) == {0, 1, 2, 3}
    assert reference_adts(rows, [0.25] * 4, 4, None, False) == {0, 2, 3}
    # attention calibrates the diversity: with a strong token 3 the first pick is 3, not 2
    att = torch.tensor([[0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    assert adts(frame, att, 2, exclude=True)[0].tolist() == [True, False, False, True]
    assert reference_adts(rows, att[0].tolist(), 2, None, True) == {0, 3}
    # the scorer: frame e1, e1, 2 e2, 2 e2, e3 at alpha = 1, K = 4: e3 first, then 2 e2 (more attention),
    # then e1; the fourth pick sees distance 0 everywhere: ``attn_div`` takes the first unchosen token (1),
    # ``attn_div_v2`` re-picks token 0 and the budget is filled by attention (token 3, a 2 e2)
    frame = torch.stack([e[0], e[0], 2 * e[1], 2 * e[1], e[2]])
    sig = make_signals([5], [4], grid=[(1, 1, 5)], hidden=[frame.float()], kind=["video"])
    assert FlashVIDScorer(alpha=1.0, selection="attn_div").select(sig).keep[0].tolist() == [True, True, True, False, True]
    assert FlashVIDScorer(alpha=1.0).select(sig).keep[0].tolist() == [True, False, True, True, True]


OPTIONS = [
    dict(),  # released defaults: attn_div_v2, min 8 segments (every frame its own segment here)
    dict(min_segments=1),
    dict(min_segments=2, selection="attn_div"),
    dict(min_segments=4, selection="attn_div", alpha=0.4),
    dict(min_segments=1, alpha=0.3, tau=0.6),
]


@pytest.mark.parametrize("T,N,changes,moving,noise", CASES)
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
def test_flashvid_equals_released_rule(T, N, changes, moving, noise, opt):
    x = scenes(T, N, 5, changes, moving, noise, seed=opt)
    # K = ceil(b / T) < N: at K = N (nothing to compress) the released lower bound leaves no token to merge
    # and its ``topk(k=0)`` raises
    exact = [check_against_reference(x, b, **OPTIONS[opt]) for b in range(T, T * (N - 1) + 1, max(1, T // 2))]
    assert any(exact), "no budget hit the released count exactly"


@pytest.mark.parametrize("seed", range(4))
def test_flashvid_random_features(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 10, 4, generator=g, dtype=torch.float64)
    for opt in (dict(min_segments=1, segment_tau=-1.0), dict(min_segments=3, selection="attn_div")):
        for b in (6, 12, 24, 36):
            check_against_reference(x, b, **opt)


def test_flashvid_images_refused_and_video_kinds():
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)]
    sig = make_signals([16, 16], [4, 16], grid=[(1, 4, 4), (1, 4, 4)], hidden=h, kind=["video", "image"])
    assert FlashVIDScorer().select(sig).keep.sum(1).tolist() == [4, 16]
    sig = make_signals([16], [4], grid=[(1, 4, 4)], hidden=h[:1], kind=["image"])
    with pytest.raises(PruningConfigError, match="not supported"):
        FlashVIDScorer().select(sig)
    sig = make_signals([16], [4], grid=[(1, 4, 4)], kind=["video"])
    with pytest.raises(PruningConfigError, match="hidden"):
        FlashVIDScorer().select(sig)


def test_flashvid_preset():
    plan = vtoken.build_plan("flashvid", 0.3)
    assert [(st.layer, st.mode) for st in plan] == [(0, "merge"), (20, "select")]
    assert plan[0].keep == 0.3 and plan[1].keep == pytest.approx(0.09)
    assert isinstance(plan[0].scorer, FlashVIDScorer) and isinstance(plan[1].scorer, FastVScorer)
    assert [st.keep for st in vtoken.build_plan("flashvid", 64, r=0.1, layers=28)] == [64, 7]
    assert len(vtoken.build_plan("flashvid", 64, layers=())) == 1
    for bad in (dict(alpha=2.0), dict(selection="div"), dict(r=0.0), dict(min_segments=0)):
        with pytest.raises(PruningConfigError):
            vtoken.build_plan("flashvid", 64, **bad)


# ---------------------------------------------------------------- end to end
SECOND = math.ceil(KEEP * 0.3)  # KEEP: test_scorers_holitom's budget for its video batch


def run(model, inputs):
    with vtoken.apply_pruning(model, method="flashvid", keep=KEEP, layers=2, min_segments=2) as h, torch.no_grad():
        return model(**inputs).logits, h.stats


ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"]


@pytest.mark.parametrize("arch", ARCHS)
def test_flashvid_end_to_end_budgets_and_batch(arch):
    check_video_budgets_and_batch(arch, run, KEEP, SECOND)


@pytest.mark.parametrize("arch", ARCHS)
def test_flashvid_generate_cache_on_off_equal(arch):
    check_video_cache_on_off(arch, "flashvid", min_segments=2)


def test_flashvid_end_to_end_kept_set_is_the_released_rule_on_the_llm_inputs():
    """Qwen2-VL, one 8-frame video: the first stage keeps what the scorer keeps on the features
    entering the LLM (grid (8, 2, 2)), and where the released count is the budget, the released set."""
    model = get_model("qwen2_vl")
    inputs = tm.qwen_inputs(model, [[("video", (8, 4, 4))]])
    x = tm.llm_inputs_at(model, inputs).double().reshape(8, 4, -1)
    exact = 0
    for budget in (8, 16, 24):
        with vtoken.apply_pruning(model, method="flashvid", keep=budget, layers=(), min_segments=2) as h, \
                torch.no_grad():
            model(**inputs)
            kept = {(j // 4, j % 4) for j in h.stats.stages[0].kept[0].tolist()}
        assert kept == run_scorer(x, budget, min_segments=2)[0]
        ref, _, _ = reference_flashvid(x.float().double(), budget // 8, min_segments=2)
        if len(ref) == budget:
            assert kept == ref
            exact += 1
    assert exact


def test_flashvid_qwen3_vl_groups_are_one_video():
    """Qwen3-VL makes each temporal group a segment: the rule runs over the whole video (one frame
    per group) and each group keeps its budget: the rule's tokens of that group first, then its
    others, by attention."""
    model = get_model("qwen3_vl")
    inputs = tm.qwen_inputs(model, [[("video", (6, 4, 4))]])
    T, N = 6, 4
    x = tm.llm_inputs_at(model, inputs).double().reshape(T, N, -1).float().double()
    for budget in (1, 2, 3):
        with vtoken.apply_pruning(model, method="flashvid", keep=budget, layers=(), min_segments=2) as h, \
                torch.no_grad():
            model(**inputs)
            stats = h.stats
        assert [seg.grid for seg in stats.segments[0]] == [(1, 2, 2)] * T
        ref, _, att = reference_flashvid(x, budget, min_segments=2)
        got = [sorted(j % N for j in stats.stages[0].kept[0].tolist() if j // N == f) for f in range(T)]
        for f in range(T):
            ranked = sorted(range(N), key=lambda p: ((f, p) not in ref, -att[(f, p)], p))
            assert got[f] == sorted(ranked[:budget])


@pytest.mark.parametrize("permute", [None, 5])
@pytest.mark.parametrize("opt", [0, 2, 4])
def test_flashvid_batch_equals_each_video_alone(permute, opt):
    """Videos with different content, frame counts and frame sizes, and Qwen3-VL-style group videos,
    in one call: each keeps, merges and ranks what it does alone, and holds the released rule."""
    check_batch_equals_alone(lambda: FlashVIDScorer(**OPTIONS[opt]), permute,
                             lambda x, b: check_against_reference(x, b, **OPTIONS[opt]))


@pytest.mark.parametrize("opt", [0, 2])
def test_flashvid_syncs_do_not_grow_with_batch_segments_or_frames(opt):
    check_syncs_fixed(lambda: FlashVIDScorer(**OPTIONS[opt]))
