"""DyCoke's temporal token merging (Tao et al., CVPR 2025): kept sets equal a plain-loop reference
written from the authors' released ``dycole_ttm`` (github.com/KD-TAO/DyCoke,
llava/model/llava_arch.py at dd74634) at the released count, on hand-built videos with known
repeats across frames and on random ones; the budget mapping, image fallback and end to end on a
tiny Qwen2-VL with a video."""

import pytest
import torch

import tiny_models as tm
import vtoken
from conftest import count_syncs, get_model
from vtoken.scorers import DyCokeScorer, UniformScorer
from vtoken.scorers.dycoke import dycoke_released_count
from vtoken.scorers.testing import make_signals, permute_slots


def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def reference_ttm(x, k):
    """The released TTM in plain loops on x (T, N, D): the kept (frame, position) pairs.
    Pairs (i, i+1) for even i; then frame i+2 against frame i for i = 0, 4, ... < T - 4; a pruned
    frame keeps its int((1 - k) N) least similar tokens; the last frame of an odd count is dropped."""
    T, N = x.shape[0], x.shape[1]
    m = int((1 - k) * N)

    def least_similar(f, r):
        sims = [(cos(x[f, p], x[r, p]), p) for p in range(N)]
        return {p for _, p in sorted(sims)[:m]}

    frames = {}
    for i in range(0, T - 1, 2):
        frames[i] = set(range(N))
        frames[i + 1] = least_similar(i + 1, i)
    for i in range(0, T - 4, 4):
        frames[i + 2] = least_similar(i + 2, i)
    return {(f, p) for f, ps in frames.items() for p in ps}


def kept_pairs(sel, s, t, n):
    per = n // t
    return {(j // per, j % per) for j in torch.nonzero(sel.keep[s]).flatten().tolist()}


def video(t, h, w, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, h * w, dim, generator=g)


def hand_built(t, n, moving, dim=8):
    """Frame 0 random; each later frame repeats its previous frame except at the ``moving``
    positions, which get fresh features (so their similarity is low and they are kept first)."""
    g = torch.Generator().manual_seed(7)
    x = torch.empty(t, n, dim)
    x[0] = torch.randn(n, dim, generator=g)
    for f in range(1, t):
        x[f] = x[f - 1]
        for p in moving[f]:
            x[f, p] = torch.randn(dim, generator=g)
    return x


@pytest.mark.parametrize("t", [2, 4, 6, 8, 10, 12, 16])
@pytest.mark.parametrize("k", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dycoke_equals_released_rule_random(t, k, seed):
    h, w = 3, 4
    x = video(t, h, w, seed=seed)
    budget = dycoke_released_count(t, h * w, k)
    sig = make_signals([t * h * w], [budget], grid=[(t, h, w)], hidden=[x.reshape(t * h * w, -1)])
    sel = DyCokeScorer().select(sig)
    assert int(sel.keep.sum()) == budget
    assert kept_pairs(sel, 0, t, t * h * w) == reference_ttm(x, k)


def test_dycoke_hand_built_repeats():
    """8 frames of 6 tokens; in every pruned frame exactly 3 positions move (k = 0.5 keeps 3): the
    kept tokens are the anchors (frames 0, 4, 6) and exactly the moving positions of the rest."""
    t, n = 8, 6
    moving = {f: {f % n, (f + 2) % n, (f + 4) % n} if f % 2 else {(f + 1) % n, (f + 3) % n, (f + 5) % n}
              for f in range(1, t)}
    x = hand_built(t, n, moving)
    sig = make_signals([t * n], [dycoke_released_count(t, n, 0.5)], grid=[(t, 2, 3)], hidden=[x.reshape(t * n, -1)])
    kept = kept_pairs(DyCokeScorer().select(sig), 0, t, t * n)
    assert kept == reference_ttm(x, 0.5)
    for f in (0, 4, 6):
        assert {(f, p) for p in range(n)} <= kept
    # frame 1 vs frame 0: exactly the positions that moved in frame 1
    assert {p for (f, p) in kept if f == 1} == moving[1]
    # frame 3 vs frame 2: its own moving positions; frame 7 vs frame 6 likewise
    assert {p for (f, p) in kept if f == 3} == moving[3]
    assert {p for (f, p) in kept if f == 7} == moving[7]
    # frame 2 vs frame 0: what moved in frames 1 or 2 (here {1,3,5} and {3,5,1}: the same three)
    assert {p for (f, p) in kept if f == 2} == moving[2]


@pytest.mark.parametrize("t", [3, 5, 9])
def test_dycoke_odd_count_drops_last_frame_last(t):
    h, w = 2, 3
    x = video(t, h, w, seed=t)
    n = t * h * w
    k = 0.5
    budget = dycoke_released_count(t, h * w, k)
    sig = make_signals([n, n], [budget, n - h * w], grid=[(t, h, w)] * 2, hidden=[x.reshape(n, -1)] * 2)
    sel = DyCokeScorer().select(sig)
    assert kept_pairs(sel, 0, t, n) == reference_ttm(x, k)
    # every token but the last frame's fills a budget of n - per_frame
    assert kept_pairs(sel, 1, t, n) == {(f, p) for f in range(t - 1) for p in range(h * w)}


def test_dycoke_budgets_nested_and_exact():
    t, h, w = 8, 2, 2
    x = video(t, h, w, seed=3).reshape(t * h * w, -1)
    n = t * h * w
    budgets = list(range(0, n + 1, 3)) + [n]
    sig = make_signals([n] * len(budgets), budgets, grid=[(t, h, w)] * len(budgets), hidden=[x] * len(budgets))
    sel = DyCokeScorer().select(sig)
    assert sel.keep.sum(1).tolist() == budgets
    for a in range(len(budgets) - 1):  # a prefix of one ranking
        assert not (sel.keep[a] & ~sel.keep[a + 1]).any()
    # anchors (frames 0, 4, 6) before any pruned frame's token; frame 0 first
    anchors = {0, 4, 6}
    order = torch.argsort(sel.scores[0], descending=True, stable=True).tolist()
    frames = [j // (h * w) for j in order]
    assert set(frames[:4]) == {0} and set(frames[:12]) == anchors


def test_dycoke_images_keep_uniform_subgrid():
    """t == 1 (an image), an unknown grid, or a grid that does not match the count: the uniform
    baseline's even sub-grid, exactly the budget."""
    g = torch.Generator().manual_seed(0)
    hid = [torch.randn(16, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(32, 8, generator=g)]
    sig = make_signals([16, 12, 32], [5, 4, 9], grid=[(1, 4, 4), None, (2, 4, 4)], hidden=hid)
    sel = DyCokeScorer().select(sig)
    ref = UniformScorer().select(sig).keep
    assert torch.equal(sel.keep[:2], ref[:2])
    assert sel.keep.sum(1).tolist() == [5, 4, 9]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("frames", [4, 8])
def test_dycoke_end_to_end_video(arch, frames):
    """A one-video prompt on tiny Qwen2-VL: the kept tokens are the released TTM's at its count,
    and at any budget the kept count is the budget."""
    model = get_model(arch)
    inputs = tm.qwen_inputs(model, [[("video", (frames, 4, 4))]])
    feats = tm.llm_inputs_at(model, inputs)
    t, h, w = frames, 2, 2
    x = feats.reshape(t, h * w, -1)
    for k in (0.5, 0.75):
        budget = dycoke_released_count(t, h * w, k)
        with vtoken.apply_pruning(model, method="dycoke", keep=budget) as hd, torch.no_grad():
            model(**inputs)
            kept = hd.stats.stages[0].kept[0].tolist()
        assert {(j // (h * w), j % (h * w)) for j in kept} == reference_ttm(x, k)
    for keep in (1, 5, 0.5):
        with vtoken.apply_pruning(model, method="dycoke", keep=keep) as hd, torch.no_grad():
            model(**inputs)
            assert len(hd.stats.stages[0].kept[0]) == (keep if isinstance(keep, int) else int(keep * t * h * w))


# (t, h, w, merging ratio or a budget, seed): ragged frame counts and frame sizes, an odd count,
# an image, and a segment with no grid (the uniform rule)
BATCH = [(8, 3, 4, 0.5, 0), (5, 2, 3, 0.7, 1), (12, 2, 2, 0.3, 2), (1, 4, 4, 5, 3), (None, 1, 12, 4, 4)]


def batch_signals(cases, permute=None):
    xs, counts, budgets, grids = [], [], [], []
    for t, h, w, k, seed in cases:
        xs.append(video(t or 1, h, w, seed=seed).reshape((t or 1) * h * w, -1))
        counts.append(xs[-1].shape[0])
        budgets.append(dycoke_released_count(t, h * w, k) if isinstance(k, float) else k)
        grids.append((t, h, w) if t else None)
    sig = make_signals(counts, budgets, grid=grids, hidden=xs)
    if permute is not None:  # real slots scattered among padding; positions by ``index``
        permute_slots(sig, permute)
    return xs, sig


@pytest.mark.parametrize("permute", [None, 5])
def test_dycoke_batch_equals_each_segment_alone(permute):
    """Videos with different content, frame counts and frame sizes, an image and a grid-less
    segment in one call: every row keeps (and ranks) what it does alone, the videos the released
    TTM set."""
    xs, sig = batch_signals(BATCH, permute)
    sel = DyCokeScorer().select(sig)
    assert not (sel.keep & ~sig.mask).any()
    for s, (x, case) in enumerate(zip(xs, BATCH)):
        alone = DyCokeScorer().select(make_signals([x.shape[0]], [int(sig.budget[s])], grid=[sig.grid[s]], hidden=[x]))
        real = sig.mask[s].nonzero().flatten()
        t, h, w, k, _ = case
        by_index = real[torch.argsort(sig.index[s, real])] if t else real  # no grid: the slot order
        assert torch.equal(sel.keep[s, by_index], alone.keep[0]), s
        assert torch.equal(sel.scores[s, by_index], alone.scores[0]), s
        if isinstance(k, float):
            per = h * w
            kept = {(j // per, j % per) for j in alone.keep[0].nonzero().flatten().tolist()}
            assert kept == reference_ttm(x.reshape(t, per, -1), k), s


def test_dycoke_syncs_do_not_grow_with_batch_or_frames():
    """The host syncs of a call are a fixed number: one video or four (with an image and a
    grid-less segment), 4 frames or 32."""
    def syncs(cases):
        _, sig = batch_signals(cases)
        return count_syncs(lambda: DyCokeScorer().select(sig))

    one, four = syncs(BATCH[:1]), syncs(BATCH[1:])
    few, many = syncs([(4, 2, 2, 0.5, 0)]), syncs([(32, 2, 2, 0.5, 0), (31, 2, 2, 0.5, 1)])
    images = syncs([(1, 4, 4, 5, s) for s in range(4)])
    assert one == four == few == many == images <= 1, (one, four, few, many, images)
