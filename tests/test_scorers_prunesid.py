"""PruneSID (Fang, Lyu et al., ICLR 2026): kept sets equal a plain-loop reference written from the
authors' released ``CLIPVisionTower_PruneSID.forward`` (github.com/ZhengyaoFang/PruneSID,
prunesid/prunesid_llava/clip_encoder.py at 390d7606), per segment, on hand-built signals; exact
budgets and edge cases; end to end on tiny LLaVA (the model's own signals, batch == each sample
alone, cache on == cache off) and the refusal where the tower has no [CLS] attention (Qwen2-VL)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from conftest import count_syncs
from vtoken.errors import PruningConfigError
from vtoken.scorers import PruneSIDScorer
from vtoken.scorers.testing import make_signals, permute_slots


def reference_prunesid(x, attn, T, per=4, scale=32.0, cap=5):
    """The released rule on one segment (numpy, loops), returning the kept token indices.

    PCA: numpy's exact SVD of sigmoid(x).T with each token's column centred; a token's group is
    the component (of the first int(T / per)) with its largest |loading| -- |.| makes the SVD's sign
    choice irrelevant. NMS per group, tokens in decreasing attention (ties: earlier token), a
    zero-attention token never survives, threshold (T / scale) * mean cosine similarity over
    pairs i < j. Shares: floor min(1, size), cap min(cap * ceil(T / 64), size, survivors), caps
    raised together while they sum below T, T - 1 - floors split by exactly rounded (half to
    even) cumulative survivor shares, shortfall filled in decreasing survivor count. vtoken's fill to exactly T
    (the released [CLS] slot) takes the most attended unkept tokens."""
    c, D = x.shape
    T = min(T, c)
    if T == c:
        return list(range(c))
    if T == 0:
        return []
    G = min(max(1, int(T / per)), D, c)
    a = 1.0 / (1.0 + np.exp(-x))
    a = (a - a.mean(axis=1, keepdims=True)).T  # (D, c): column j is token j, centred over D
    _, sv, vt = np.linalg.svd(a, full_matrices=False)
    G = max(1, min(G, int((sv > sv[0] * max(a.shape) * np.finfo(float).eps).sum())))  # the rank: see the scorer
    loads = np.abs(vt[:G])  # (G, c)
    group = [int(np.argmax(loads[:, j])) for j in range(c)]
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = z @ z.T
    mean = np.mean([sim[i, j] for i in range(c) for j in range(i + 1, c)])
    thr = T / scale * mean
    by_attn = sorted(range(c), key=lambda i: (-attn[i], i))
    members = [[i for i in by_attn if group[i] == g] for g in range(G)]
    survivors = []
    for g in range(G):
        out, gone = [], set()
        for i in members[g]:
            if i in gone or attn[i] <= 0:
                continue
            out.append(i)
            gone |= {j for j in members[g] if sim[i, j] > thr}
        survivors.append(out)
    size = [len(m) for m in members]
    nms = [len(s) for s in survivors]
    lower = [min(1, s) for s in size]
    upper = [min(cap * math.ceil(T / 64), s, k) for s, k in zip(size, nms)]
    while sum(upper) < T:
        upper = [min(u + 1, s) for u, s in zip(upper, size)]
    other = max(T - sum(lower) - 1, 0)
    d = [round(Fraction(other * sum(nms[: g + 1]), sum(nms))) for g in range(G)]
    take = [min(d[g] - (d[g - 1] if g else 0) + lower[g], upper[g]) for g in range(G)]
    for g in sorted(range(G), key=lambda g: (-nms[g], g)):
        if sum(take) >= other + sum(lower):
            break
        take[g] += min(upper[g] - take[g], other + sum(lower) - sum(take))
    kept = []
    for g in range(G):
        ranked = survivors[g] + [i for i in members[g] if i not in survivors[g]]
        kept += ranked[: take[g]]
    rest = [i for i in by_attn if i not in kept]
    if len(kept) < T:
        kept += rest[: T - len(kept)]
    elif len(kept) > T:
        kept = [i for i in by_attn if i in kept][:T]
    return sorted(kept)


def clustered(c, dim, seed, centres=6, spread=0.3, offset=1.0):
    """Features in a few clusters around a shared offset (positive mean cosine similarity, so the
    NMS threshold bites) and softmax-like positive attention."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(centres, dim, generator=g)
    which = torch.randint(0, centres, (c,), generator=g)
    x = offset + base[which] + spread * torch.randn(c, dim, generator=g)
    attn = torch.softmax(torch.randn(c, generator=g) * 2, dim=0)
    return x.double(), attn.double()


COUNTS = [23, 9, 1, 16, 40, 57]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budgets", [[7, 9, 1, 5, 12, 10], [1, 2, 1, 15, 39, 3], [20, 4, 1, 8, 33, 31]])
@pytest.mark.parametrize("opts", [{}, {"tokens_per_component": 2, "nms_scale": 8.0}, {"cap": 1},
                                  {"tokens_per_component": 1, "nms_scale": 64.0, "cap": 2}])
def test_prunesid_equals_released_rule(seed, budgets, opts):
    data = [clustered(c, 24, seed * 100 + s, offset=0.5 * (s % 3)) for s, c in enumerate(COUNTS)]
    sig = make_signals(COUNTS, budgets, hidden=[d[0] for d in data], vision_attn=[d[1] for d in data])
    sel = PruneSIDScorer(**opts).select(sig)
    assert sel.keep.sum(1).tolist() == [min(b, c) for b, c in zip(budgets, COUNTS)]
    assert not (sel.keep & ~sig.mask).any()
    per, scale, cap = opts.get("tokens_per_component", 4), opts.get("nms_scale", 32.0), opts.get("cap", 5)
    for s, (x, a) in enumerate(data):
        ref = reference_prunesid(x.numpy(), a.tolist(), budgets[s], per, scale, cap)
        assert sel.keep[s].nonzero().flatten().tolist() == ref, (s, budgets[s])
    assert sig.diagnostics["erank"].shape == (len(COUNTS),)


@pytest.mark.parametrize("T", [64, 192])
def test_prunesid_equals_released_rule_at_llava_size(T):
    # LLaVA-1.5's 576 tokens at the paper's budgets: 16 / 48 groups, caps of 5 / 15 per group
    x, a = clustered(576, 48, seed=T, centres=20, offset=0.7)
    sig = make_signals([576], [T], hidden=[x], vision_attn=[a])
    kept = PruneSIDScorer().select(sig).keep[0].nonzero().flatten().tolist()
    assert kept == reference_prunesid(x.numpy(), a.tolist(), T)
    assert len(kept) == T


def test_prunesid_keeps_one_of_each_near_duplicate_pair():
    # two groups of near-duplicates (directions e0 / e1, same offset); with T = 2 one group each
    e = torch.eye(4, dtype=torch.float64)
    x = torch.stack([e[0], e[0] * 1.01, e[0] * 0.99, e[1], e[1] * 1.01, e[1] * 0.98]) * 4
    a = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.09, 0.06], dtype=torch.float64)
    sel = PruneSIDScorer(tokens_per_component=1).select(make_signals([6], [2], hidden=[x], vision_attn=[a]))
    kept = sel.keep[0].nonzero().flatten().tolist()
    assert kept == reference_prunesid(x.numpy(), a.tolist(), 2, per=1)
    assert len({0, 1, 2} & set(kept)) == 1 and len({3, 4, 5} & set(kept)) == 1


@pytest.mark.parametrize("counts,budgets", [([1, 2, 3, 5], [1, 1, 2, 3]), ([2, 3, 4], [2, 3, 9]),
                                            ([4, 6, 7], [0, 6, 1]), ([5, 8], [4, 7])])
def test_prunesid_budgets_and_tiny_segments(counts, budgets):
    data = [clustered(c, 8, 50 + s) for s, c in enumerate(counts)]
    sig = make_signals(counts, budgets, hidden=[d[0] for d in data], vision_attn=[d[1] for d in data])
    keep = PruneSIDScorer().select(sig).keep
    assert keep.sum(1).tolist() == [min(b, c) for b, c in zip(budgets, counts)]
    for s, (x, a) in enumerate(data):
        assert keep[s].nonzero().flatten().tolist() == reference_prunesid(x.numpy(), a.tolist(), budgets[s])


def test_prunesid_zero_attention_and_padding_slots():
    # zero-attention tokens never survive NMS but still fill the budget; an emptied segment keeps nothing
    x, a = clustered(12, 8, 7)
    a[[2, 5, 9]] = 0.0
    sig = make_signals([12, 5], [10, 3], hidden=[x, x[:5]], vision_attn=[a, a[:5]])
    sig.mask[1] = False
    sig.budget[1] = 0
    keep = PruneSIDScorer().select(sig).keep
    assert keep[0].nonzero().flatten().tolist() == reference_prunesid(x.numpy(), a.tolist(), 10)
    assert keep[1].sum() == 0


def test_prunesid_rejects_bad_options():
    for bad in ({"tokens_per_component": 0}, {"nms_scale": 0.0}, {"cap": 0}):
        with pytest.raises(ValueError):
            PruneSIDScorer(**bad)


def _llava_signals(model, inputs, sample=0):
    """The projected embeddings and the [CLS] attention (heads averaged) of one sample's image,
    computed from the model itself (see test_scorers_scope.llava_signals)."""
    from test_scorers_scope import llava_signals
    from conftest import slice_sample

    return llava_signals(model, slice_sample(inputs, sample, model) if sample is not None else inputs)


def test_prunesid_end_to_end_equals_reference_on_the_models_signals():
    import vtoken
    from conftest import get_inputs, get_model

    model = get_model("llava", attn="eager")  # eager: the encoder returns its attention maps here
    inputs = get_inputs("llava", model, variant="single")
    feats, cls = _llava_signals(model, inputs, sample=None)
    for k in (3, 7, 12):
        with vtoken.apply_pruning(model, method="prunesid", keep=k) as h, torch.no_grad():
            model(**inputs)
            kept = h.stats.stages[0].kept[0].tolist()
        assert kept == reference_prunesid(feats, cls.tolist(), k)


def _run(model, inputs, keep=0.5):
    import vtoken

    with vtoken.apply_pruning(model, method="prunesid", keep=keep) as h, torch.no_grad():
        return model(**inputs).logits, h.stats


def test_prunesid_batch_equals_each_sample_alone():
    from conftest import slice_sample
    from test_scorers_e2e import last_slot, model_and_inputs

    model, inputs = model_and_inputs("llava")
    out, stats = _run(model, inputs)
    slot = last_slot(stats, inputs)
    for b in range(inputs["input_ids"].shape[0]):
        one, one_stats = _run(model, slice_sample(inputs, b, model))
        torch.testing.assert_close(out[b, slot[b]], one[0, -1], rtol=1e-4, atol=1e-4)
        if one_stats is not None and one_stats.stages and len(one_stats.stages[0].kept[0]):
            assert torch.equal(stats.stages[0].kept[b], one_stats.stages[0].kept[0])


def test_prunesid_cache_equals_no_cache():
    import vtoken
    from conftest import SUPPRESS
    from test_scorers_e2e import model_and_inputs

    model, inputs = model_and_inputs("llava")
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)
    with vtoken.apply_pruning(model, method="prunesid", keep=0.5):
        a = model.generate(**inputs, use_cache=True, **gen)
        b = model.generate(**inputs, use_cache=False, **gen)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_vl_images"])
def test_prunesid_refused_without_cls_attention(arch):
    import vtoken
    from test_scorers_e2e import model_and_inputs

    model, _ = model_and_inputs(arch)
    with pytest.raises(PruningConfigError, match=r"\[CLS\] attention"):
        vtoken.apply_pruning(model, method="prunesid", keep=0.5)
    # the model is left unpruned: a plain method applies afterwards
    vtoken.apply_pruning(model, method="fastv", keep=0.5).remove()


def test_prunesid_syncs_do_not_grow_with_nms_rounds_or_segments():
    """The NMS runs as tensor ops over a fixed number of rounds, batched over the segments of
    equal size: the host syncs of a call are the same whatever the number of NMS rounds (one
    group: many rounds; many groups: few) or of segments in the batch, and the kept sets still
    equal the released rule."""
    from vtoken.scorers.prunesid import prunesid_batch

    data = [clustered(40, 12, seed=s, centres=3, offset=0.4) for s in range(3)]
    counts = []
    for budgets in ([4, 4, 4], [24, 24, 24]):
        sig = make_signals([40] * 3, budgets, hidden=[d[0] for d in data], vision_attn=[d[1] for d in data])
        sel = {}
        counts.append(count_syncs(lambda: sel.setdefault("s", PruneSIDScorer().select(sig))))
        for s in range(3):
            ref = reference_prunesid(data[s][0].numpy(), data[s][1].tolist(), budgets[s])
            assert sel["s"].keep[s].nonzero().flatten().tolist() == ref
    assert counts[0] == counts[1], counts
    x = torch.stack([d[0] for d in data])
    a = torch.stack([d[1] for d in data])
    alone = count_syncs(lambda: prunesid_batch(x[:1], a[:1], [4]))
    together = count_syncs(lambda: prunesid_batch(x, a, [4, 24, 9]))
    assert alone == together <= 2, (alone, together)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [None, 1])
def test_prunesid_batched_equal_sizes_and_scattered_padding_equal_released_rule(seed, chunk, monkeypatch):
    """Segments of equal size are solved in one batched call, each with its own budget (so its
    own number of groups and NMS threshold), in chunks (``chunk=1``: one segment per call); real
    slots need not come first in a row."""
    if chunk is not None:
        monkeypatch.setattr("vtoken.scorers.prunesid._CHUNK_BYTES", chunk)
    counts, budgets = [30, 30, 17, 30, 17, 30], [4, 30, 5, 12, 16, 0]
    data = [clustered(c, 16, seed * 50 + s, offset=0.3 * (s % 3)) for s, c in enumerate(counts)]
    sig = make_signals(counts, budgets, hidden=[d[0] for d in data], vision_attn=[d[1] for d in data])
    permute_slots(sig, seed, ("mask", "index", "hidden", "vision_attn"))
    sel = PruneSIDScorer().select(sig)
    for s, (x, a) in enumerate(data):
        slots = sig.mask[s].nonzero().flatten()  # slot of token j: ordered by sig.index
        by_token = slots[torch.argsort(sig.index[s, slots])]
        got = sorted(int(sig.index[s, j]) for j in by_token if sel.keep[s, j])
        assert got == reference_prunesid(x.numpy(), a.tolist(), budgets[s]), s
    assert not (sel.keep & ~sig.mask).any()


def _greedy_nms(sim, rank, group, alive, thr):
    """Per-group greedy NMS as the released loop runs it, one segment: tokens in rank order, a
    live candidate survives and removes the later tokens of its group above the threshold."""
    c = len(rank)
    gone, out = set(), []
    for i in sorted(range(c), key=lambda i: rank[i]):
        if i in gone or not alive[i]:
            continue
        out.append(i)
        gone |= {j for j in range(c) if group[j] == group[i] and sim[i][j] > thr}
    return sorted(out)


@pytest.mark.parametrize("steps", [1, 8])
def test_prunesid_nms_equals_the_greedy_loop_on_long_chains(steps, monkeypatch):
    """The batched NMS (Jacobi steps on the suppression edges) keeps what the sequential greedy
    loop keeps: on a chain where each token removes only the next (every other token survives:
    the longest dependency chain, 30 links, past the unconditional steps) and on random similarity
    matrices with ragged groups, with the unconditional steps cut to 1 so the finishing path runs."""
    from vtoken.scorers import prunesid as P

    monkeypatch.setattr(P, "_NMS_STEPS", steps)
    g = torch.Generator().manual_seed(0)
    B, c = 4, 31
    sims, groups, alives = [], [], []
    chain = torch.zeros(c, c, dtype=torch.float64)
    chain[torch.arange(c - 1), torch.arange(1, c)] = 1.0
    sims.append(chain), groups.append(torch.zeros(c, dtype=torch.long)), alives.append(torch.ones(c, dtype=torch.bool))
    for _ in range(B - 1):
        sims.append(torch.rand(c, c, generator=g, dtype=torch.float64))
        groups.append(torch.randint(0, 3, (c,), generator=g))
        alives.append(torch.rand(c, generator=g) > 0.1)
    sim, group, alive = torch.stack(sims), torch.stack(groups), torch.stack(alives)
    rank = torch.stack([torch.arange(c)] + [torch.randperm(c, generator=g) for _ in range(B - 1)])
    thr = torch.tensor([0.5, 0.7, 0.8, 0.9], dtype=torch.float64)
    rounds = max(int(torch.bincount(row).max()) for row in group)
    survivor, converged, edges = P._nms(sim, rank, group, alive, thr, rounds)
    if not bool(converged.all()):
        survivor = P._nms_finish(alive, edges, survivor, rounds)
    assert not bool(converged[0])  # the chain needs more than `steps` steps
    for b in range(B):
        want = _greedy_nms(sim[b].tolist(), rank[b].tolist(), group[b].tolist(), alive[b].tolist(), float(thr[b]))
        assert survivor[b].nonzero().flatten().tolist() == want, b
    assert survivor[0].nonzero().flatten().tolist() == list(range(0, c, 2))


def test_prunesid_ops_do_not_grow_with_nms_rounds():
    """One group of 200 tokens (up to 200 greedy rounds) costs the same number of tensor ops as
    many small groups: the NMS runs a fixed number of batched steps, not one loop per round."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vtoken.scorers.prunesid import prunesid_batch

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.n += 1
            return func(*args, **(kwargs or {}))

    x, a = clustered(200, 16, seed=3, centres=4, offset=0.4)
    counts = []
    for budget in (3, 150):  # int(T / 4) groups: 1 group (rounds = 200) or 16 groups (far fewer)
        Ops.n = 0
        with Ops():
            prunesid_batch(x[None], a[None], [budget])
        counts.append(Ops.n)
    assert counts[0] <= counts[1] + 20, counts
