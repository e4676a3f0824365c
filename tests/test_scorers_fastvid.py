"""FastVID (Shen et al., arXiv:2503.11187): kept sets equal a plain-loop reference written from the
authors' released Qwen2.5-VL code (github.com/LunarShen/FastVID at a40a109,
fastvid_qwen25vl/.../qwenvlutils/modeling_qwen2_5_vl.py: DySeg, the per-segment salient / context
counts, DPC-kNN context tokens), with the scorer's documented salience (each token's dot product
with its frame's mean hidden state), on videos with scenes of near-repeated frames and random ones;
the budget mapping; image segments; end to end on a tiny Qwen2-VL with a video."""

import math

import numpy as np
import pytest
import torch

import tiny_models as tm
import vtoken
from conftest import count_syncs, get_model
from vtoken.scorers import FastVIDScorer
from vtoken.scorers.testing import make_signals, permute_slots

C, TAU, IGNORE, D, P = 8, 0.84, 0.95, 0.4, 4


def cuts_to_sizes(cuts, n):
    sizes = [cuts[0] + 1]
    for i in range(1, len(cuts)):
        sizes.append(cuts[i] - cuts[i - 1])
    sizes.append(n - cuts[-1] - 1)
    return sizes


def reference_fastvid(x, R, c=C, tau=TAU, ignore=IGNORE, d=D, p=P):
    """Released selection in plain loops on x (T, N, Dm) float64 with R tokens per frame: the kept
    (frame, position) pairs."""
    T, N, Dm = x.shape
    mean = x.mean(axis=1)
    glob = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    sal = np.einsum("fnd,fd->fn", x, mean)
    sims = [float(glob[f] @ glob[f + 1]) for f in range(T - 1)]
    low = sorted(range(T - 1), key=lambda f: (sims[f], f))[:c - 1]
    cuts = sorted(set(low) | {f for f in range(T - 1) if sims[f] < tau})
    sizes = cuts_to_sizes(cuts, T) if cuts else [T]
    kept = set()
    start = 0
    for L in sizes:
        seg_retain = R * L
        seg_context = max(int(seg_retain * d), 1)
        seg_salient = seg_retain - seg_context
        if L == 1:
            frm_sal, frm_ctx = [seg_salient], [seg_context]
        else:
            g = glob[start:start + L]
            sub_cuts = [i for i in range(L - 1) if float(g[i] @ g[i + 1]) < ignore]
            sub = cuts_to_sizes(sub_cuts, L) if sub_cuts else [L]
            V = len(sub)
            sal_share = [seg_salient // V + (1 if i < seg_salient % V else 0) for i in range(V)]
            tnum = (V + p - 1) // p
            ctx_share = [seg_context // tnum + (1 if i < seg_context % tnum else 0) for i in range(tnum)]
            ctx, j = [], 0
            for i in range(V):
                if i % p == 0:
                    ctx.append(min(ctx_share[j], N // 2))
                    j += 1
                else:
                    ctx.append(0)
            ctx.reverse()
            frm_sal, frm_ctx = [], []
            for i in range(V):
                frm_sal += [0] * (sub[i] - 1)
                frm_ctx += [0] * (sub[i] - 1)
                if ctx[i] == 0:
                    frm_sal.append(min(sal_share[i], N))
                    frm_ctx.append(0)
                else:
                    frm_ctx.append(min(ctx[i], N // 2))
                    frm_sal.append(min(sal_share[i], N - frm_ctx[-1]))
        for i in range(L):
            f = start + i
            top = sorted(range(N), key=lambda q: (-sal[f, q], q))[:frm_sal[i]]
            kept |= {(f, q) for q in top}
            if frm_ctx[i] > 0:
                rest = [q for q in range(N) if q not in top]
                M = len(rest)
                dist = [[math.sqrt(sum((x[f, a, k] - x[f, b, k]) ** 2 for k in range(Dm))) / math.sqrt(Dm)
                         for b in rest] for a in rest]
                dmax = max(max(r) for r in dist)
                dens = [math.exp(-sum(v ** 2 for v in sorted(dist[a])[:4]) / min(4, M)) for a in range(M)]
                score = []
                for a in range(M):
                    higher = [dist[a][b] for b in range(M) if dens[b] > dens[a]]
                    score.append((min(higher) if higher else dmax) * dens[a])
                best = sorted(range(M), key=lambda a: (-score[a], a))[:frm_ctx[i]]
                kept |= {(f, rest[a]) for a in best}
        start += L
    return kept


def scenes(T, N, Dm, changes, noise, seed):
    """A video whose frames repeat a scene feature map plus small noise; a new scene starts at
    each frame in ``changes``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(T, N, Dm, dtype=torch.float64)
    base = torch.randn(N, Dm, generator=g, dtype=torch.float64) + 2.0
    for f in range(T):
        if f in changes:
            base = torch.randn(N, Dm, generator=g, dtype=torch.float64) + 2.0 * (1 + f % 3)
        x[f] = base + noise * torch.randn(N, Dm, generator=g, dtype=torch.float64)
    return x.float().double()


def select(x, budget, scorer=None):
    T, N, Dm = x.shape
    sig = make_signals([T * N], [budget], grid=[(T, 2, N // 2)], hidden=[x.reshape(T * N, Dm).float()])
    sel = (scorer or FastVIDScorer()).select(sig)
    return {(j // N, j % N) for j in torch.nonzero(sel.keep[0]).flatten().tolist()}, sel


CASES = [  # (T, N, changes, noise, R)
    (8, 12, {3, 6}, 0.05, 3),
    (16, 12, {5, 9}, 0.02, 4),
    (16, 16, set(), 0.02, 4),
    (12, 8, {4}, 0.3, 2),
    (24, 12, {6, 12, 20}, 0.01, 3),
    (6, 10, set(range(6)), 1.0, 5),
    (32, 8, {8, 16}, 0.1, 2),
]


@pytest.mark.parametrize("T,N,changes,noise,R", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_fastvid_equals_released_rule(T, N, changes, noise, R, seed):
    x = scenes(T, N, 6, changes, noise, seed)
    ref = reference_fastvid(x.numpy(), R)
    kept, sel = select(x, T * R)
    assert len(kept) == T * R
    assert ref <= kept
    # the rest of the budget (where the released caps keep fewer) goes to the most salient others
    sal = torch.einsum("fnd,fd->fn", x, x.mean(1))
    others = sorted(((-float(sal[f, q]), f * N + q) for f in range(T) for q in range(N) if (f, q) not in ref))
    extra = {(i // N, i % N) for _, i in others[:T * R - len(ref)]}
    assert kept == ref | extra


def test_fastvid_scene_structure():
    """Two static scenes of 8 frames: DySeg cuts at the change (and c - 1 = 7 lowest pairs), the
    salient tokens go to the last frame of each static run, so frames inside a static run that
    DySeg does not cut keep nothing."""
    T, N = 16, 12
    x = scenes(T, N, 6, {8}, 0.001, 0)
    ref = reference_fastvid(x.numpy(), 3, c=2)
    kept, _ = select(x, T * 3, FastVIDScorer(c=2))
    assert ref <= kept
    frames = {f for f, _ in ref}
    assert frames == {7, 15}  # one kept frame per scene: the last of its run


@pytest.mark.parametrize("budget", [0, 1, 7, 30, 96])
def test_fastvid_exact_budget(budget):
    x = scenes(8, 12, 6, {4}, 0.05, 3)
    kept, _ = select(x, budget)
    assert len(kept) == budget


def test_fastvid_image_segment_is_one_frame():
    """t == 1: the salient + context rule on the one frame (context = max(int(b * d), 1))."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 6, generator=g, dtype=torch.float64)
    for b in (1, 5, 10):
        kept, _ = select(x, b)
        assert kept == reference_fastvid(x.numpy(), b)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("frames", [4, 8])
def test_fastvid_end_to_end_video(arch, frames):
    model = get_model(arch)
    inputs = tm.qwen_inputs(model, [[("video", (frames, 4, 8))]])
    x = tm.llm_inputs_at(model, inputs).double().reshape(frames, 8, -1)
    for R in (2, 4):
        with vtoken.apply_pruning(model, method="fastvid", keep=frames * R) as hd, torch.no_grad():
            model(**inputs)
            kept = {(j // 8, j % 8) for j in hd.stats.stages[0].kept[0].tolist()}
        assert len(kept) == frames * R
        assert reference_fastvid(x.numpy(), R) <= kept


# (T, h, w, changes, noise, seed, budget): ragged frame counts and sizes, an image, a random video
BATCH = [(8, 2, 6, {3, 6}, 0.05, 0, 24), (12, 2, 4, {4}, 0.3, 1, 29), (6, 2, 5, set(range(6)), 1.0, 2, 25),
         (1, 4, 4, set(), 0.0, 3, 5), (16, 2, 6, {5, 9}, 0.02, 4, 48)]


def batch_signals(cases, permute=None):
    xs = [scenes(T, h * w, 6, ch, noise, seed) for T, h, w, ch, noise, seed, _ in cases]
    sig = make_signals([x.shape[0] * x.shape[1] for x in xs], [c[-1] for c in cases],
                       grid=[(T, h, w) for T, h, w, *_ in cases], hidden=[x.reshape(-1, 6).float() for x in xs])
    if permute is not None:  # real slots scattered among padding; positions by ``index``
        permute_slots(sig, permute)
    return xs, sig


@pytest.mark.parametrize("permute", [None, 5])
def test_fastvid_batch_equals_each_video_alone(permute):
    """A batch of videos with different content, frame counts and frame sizes (and an image) is
    selected in one call: every row keeps what the video keeps alone, and holds the released set."""
    xs, sig = batch_signals(BATCH, permute)
    sel = FastVIDScorer().select(sig)
    assert not (sel.keep & ~sig.mask).any()
    for s, (x, case) in enumerate(zip(xs, BATCH)):
        T, N = x.shape[0], x.shape[1]
        kept = {(int(sig.index[s, j]) // N, int(sig.index[s, j]) % N) for j in sel.keep[s].nonzero().flatten().tolist()}
        alone, _ = select(x, case[-1])
        assert kept == alone and len(kept) == case[-1], s
        if case[-1] % T == 0:
            assert reference_fastvid(x.numpy(), case[-1] // T) <= kept, s
    # the ranking (scores) too: each row's order equals the video's own
    for s, (x, case) in enumerate(zip(xs, BATCH)):
        one = make_signals([x.shape[0] * x.shape[1]], [case[-1]], grid=[case[:3]], hidden=[x.reshape(-1, 6).float()])
        own = FastVIDScorer().select(one).scores[0]
        real = sig.mask[s].nonzero().flatten()
        by_index = real[torch.argsort(sig.index[s, real])]
        assert torch.equal(sel.scores[s, by_index], own[: real.numel()]), s


def test_fastvid_syncs_do_not_grow_with_batch_frames_or_segments():
    """The host syncs of a call are a fixed number: the same for one video as for four, and for a
    video with one DySeg segment as for one with many (every frame a new scene)."""
    def syncs(cases):
        _, sig = batch_signals(cases)
        return count_syncs(lambda: FastVIDScorer().select(sig))

    one = syncs(BATCH[:1])
    four = syncs(BATCH[:4])
    static = syncs([(32, 2, 6, set(), 0.001, 0, 64)])
    scenes_ = syncs([(32, 2, 6, set(range(32)), 1.0, 0, 64)])
    assert one == four == static == scenes_ <= 2, (one, four, static, scenes_)
