"""DART against an independent per-sample re-implementation of the authors' released rule.

The released code (Wen et al., arXiv:2502.11494; ``get_retained_image_token`` of the authors'
LLaVA and Qwen2.5-VL forks), in one sentence per step:

* pivots: the ``pivot_image`` visual tokens and the ``pivot_text`` text tokens AFTER the image
  with the largest L1 norm of their (post-RoPE) key states at layer K-1;
* features: the hidden states entering layer K passed through the LLM's final RMSNorm;
* the visual pivots are kept; pivot by pivot, each pivot keeps its least cosine-similar visual
  tokens among those that are neither pivots nor kept already.

vtoken keeps exactly the budget k: the k - pivot_image tokens beyond the visual pivots are split
over the pivots in visiting order (visual pivots by key norm, then text pivots by key norm), the
first (k - pivot_image) % P pivots taking one more. ``reference`` below is a plain loop over one
sample in float64 numpy; it shares no code with the scorer.
"""

import math

import numpy as np
import pytest
import torch

from vtoken.plan import Stage
from vtoken.scorers import DARTScorer
from vtoken.scorers.testing import make_signals


# ----------------------------------------------------------------------------- the reference


def rms_norm(x, weight, eps=1e-6):
    """The LLM's final RMSNorm, numpy float64: x / sqrt(mean(x^2) + eps) * weight."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * np.asarray(weight, dtype=np.float64)


def reference(vis_hidden, vis_keys, text_hidden, text_keys, text_after, k, pivot_image=4, pivot_text=4, p=1,
              norm_weight=None, eps=1e-6, all_text=False):
    """Kept visual indices (sorted list) of ONE sample under the released rule (see module doc).

    vis_hidden (n, D), vis_keys (n, Dk), text_hidden (T, D), text_keys (T, Dk): that sample's
    rows only (no padding); text_after: T bools (text row after the image); norm_weight: the final
    norm's weight (None = skip the norm); p: key norm order; all_text: pivots from every text row.
    """
    vis_hidden = np.asarray(vis_hidden, dtype=np.float64)
    text_hidden = np.asarray(text_hidden, dtype=np.float64).reshape(-1, vis_hidden.shape[1])
    n = vis_hidden.shape[0]
    if k >= n:
        return list(range(n))
    if norm_weight is not None:
        vis_hidden = rms_norm(vis_hidden, norm_weight, eps)
        text_hidden = rms_norm(text_hidden, norm_weight, eps) if len(text_hidden) else text_hidden

    def key_norm(row):
        row = [float(v) for v in row]
        return sum(abs(v) for v in row) if p == 1 else math.sqrt(sum(v * v for v in row))

    def cosine(a, b):
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    vnorm = [key_norm(r) for r in vis_keys]
    image_pivots = sorted(range(n), key=lambda i: (-vnorm[i], i))[: min(pivot_image, k)]
    rows = [j for j in range(len(text_hidden)) if all_text or text_after[j]]
    tnorm = {j: key_norm(text_keys[j]) for j in rows}
    text_pivots = sorted(rows, key=lambda j: (-tnorm[j], j))[:pivot_text] if pivot_text else []
    pivots = [vis_hidden[i] for i in image_pivots] + [text_hidden[j] for j in text_pivots]
    kept = list(image_pivots)
    pool = [i for i in range(n) if i not in kept]
    rest = k - len(image_pivots)
    for number, pv in enumerate(pivots):
        take = rest // len(pivots) + (1 if number < rest % len(pivots) else 0)
        if take == 0:
            continue
        ranked = sorted(pool, key=lambda i: (cosine(pv, vis_hidden[i]), i))  # least similar first
        chosen = ranked[:take]
        kept += chosen
        pool = [i for i in pool if i not in chosen]
    assert len(kept) == k and len(set(kept)) == k
    return sorted(kept)


def torch_rms(x, weight, eps=1e-6):
    x = torch.as_tensor(x, dtype=torch.float32)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * torch.as_tensor(weight, dtype=torch.float32)


def kept(sel, s=0):
    return sel.keep[s].nonzero().flatten().tolist()


def sample(seed, n, T, after, D=16, Dk=8):
    """Random signals of one sample: after = number of text rows after the image (the last ones)."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden=torch.randn(n, D, generator=g), keys=torch.randn(n, Dk, generator=g),
                text_hidden=torch.randn(T, D, generator=g), text_keys=torch.randn(T, Dk, generator=g),
                text_after=torch.arange(T) >= T - after)


def signals(samples, budgets, weight):
    """SegmentSignals of several samples (padded), normed signals through an RMSNorm of ``weight``."""
    return make_signals(
        [x["hidden"].shape[0] for x in samples], budgets, text_counts=[x["text_hidden"].shape[0] for x in samples],
        hidden=[x["hidden"] for x in samples], keys=[x["keys"] for x in samples],
        text_hidden=[x["text_hidden"] for x in samples], text_keys=[x["text_keys"] for x in samples],
        normed_hidden=[torch_rms(x["hidden"], weight) for x in samples],
        normed_text_hidden=[torch_rms(x["text_hidden"], weight) for x in samples],
        text_after=[x["text_after"] for x in samples])


def ref_of(x, k, weight=None, **kw):
    return reference(x["hidden"].numpy(), x["keys"].numpy(), x["text_hidden"].numpy(), x["text_keys"].numpy(),
                     x["text_after"].tolist(), k, norm_weight=None if weight is None else weight.numpy(), **kw)


# ----------------------------------------------------------------------------- random inputs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [5, 9, 12, 17, 30, 64, 75])
def test_matches_released_rule_on_random_inputs(seed, k):
    g = torch.Generator().manual_seed(100 + seed)
    weight = torch.rand(16, generator=g) * 2.5 + 0.1  # a trained final norm: weights != 1
    x = sample(seed, n=80, T=12, after=5)
    sel = DARTScorer().select(signals([x], [k], weight))
    assert kept(sel) == ref_of(x, k, weight)


@pytest.mark.parametrize("seed", range(4))
def test_options_match_their_documented_rules(seed):
    """The opt-in deviations: L2 key norm, pivots from every text row, final norm skipped."""
    weight = torch.linspace(0.2, 3.0, 16)
    x = sample(seed, n=60, T=10, after=3)
    sig = signals([x], [20], weight)
    assert kept(DARTScorer(key_norm=2).select(sig)) == ref_of(x, 20, weight, p=2)
    assert kept(DARTScorer(text_pivots="all").select(sig)) == ref_of(x, 20, weight, all_text=True)
    assert kept(DARTScorer(final_norm=False).select(sig)) == ref_of(x, 20, None)
    assert kept(DARTScorer(pivot_image=2, pivot_text=3).select(sig)) == ref_of(x, 20, weight, pivot_image=2,
                                                                               pivot_text=3)
    old = DARTScorer(key_norm=2, text_pivots="all", final_norm=False)
    assert kept(old.select(sig)) == ref_of(x, 20, None, p=2, all_text=True)
    assert "text_after" not in DARTScorer(text_pivots="all").needs
    assert {"hidden", "text_hidden"} <= DARTScorer(final_norm=False).needs
    assert not DARTScorer(final_norm=False).needs & {"normed_hidden", "normed_text_hidden"}
    assert {"normed_hidden", "normed_text_hidden", "text_after", "keys", "text_keys"} <= DARTScorer().needs
    with pytest.raises(ValueError):
        DARTScorer(text_pivots="before")


@pytest.mark.parametrize("k", [1, 3, 4])
def test_budget_below_pivot_count_keeps_largest_key_l1_norms(k):
    """k <= pivot_image: only visual pivots are kept, ranked by the key L1 norm (the released
    norm), which here disagrees with the L2 norm: (2, 2) has L1 4 > 3 but L2 2.83 < 3."""
    keys = torch.tensor([[3.0, 0.0], [0.0, 3.0], [2.0, 2.0], [0.0, -3.0], [-2.1, 2.1], [1.0, 1.0]])
    x = dict(hidden=torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), keys=keys,
             text_hidden=torch.ones(1, 4), text_keys=torch.ones(1, 2), text_after=torch.tensor([True]))
    sig = signals([x], [k], torch.ones(4))
    # L1: 3, 3, 4, 3, 4.2, 2 -> 4, 2, 0, 1; L2: 3, 3, 2.83, 3, 2.97, 1.41 -> 0, 1, 3, 4
    l1, l2 = {1: [4], 3: [0, 2, 4], 4: [0, 1, 2, 4]}[k], {1: [0], 3: [0, 1, 3], 4: [0, 1, 3, 4]}[k]
    assert kept(DARTScorer().select(sig)) == l1 == ref_of(x, k, torch.ones(4))
    assert kept(DARTScorer(key_norm=2).select(sig)) == l2 == ref_of(x, k, torch.ones(4), p=2)


def test_batch_of_two_with_padding_equals_per_sample_and_reference():
    weight = torch.linspace(0.3, 2.0, 16)
    a = sample(1, n=50, T=9, after=4)
    b = sample(2, n=23, T=3, after=1)  # fewer candidates and text rows: padded in the batch
    batch = DARTScorer().select(signals([a, b], [18, 9], weight))
    assert batch.keep.sum(1).tolist() == [18, 9]
    assert not batch.keep[1, 23:].any()
    for s, (x, k) in enumerate([(a, 18), (b, 9)]):
        alone = DARTScorer().select(signals([x], [k], weight))
        assert kept(batch, s) == kept(alone) == ref_of(x, k, weight)


# ----------------------------------------------------------------------------- hand-computed cases


def groups_case(after_dirs=(4, 5, 6, 7), before_dirs=(), group=1, D=16):
    """Directions e_0..e_9 (e_10..e_15 for fillers). Visual pivots e_0..e_3 (largest keys); text
    pivots e_j (j in after_dirs, after the image) and e_j (j in before_dirs, before the image, with
    the LARGEST text keys). For each direction i < 10 a group of ``group`` visual tokens
    -e_i + 0.01 r e_{i+1} + 0.1 sum_{j != i} e_j (cosine ~ -0.96 to pivot i, slightly positive to
    the others; r = 0 is the most dissimilar), and 6 fillers mildly dissimilar to EVERY pivot
    (cosine -0.17 .. -0.27): a pivot that takes more than its share takes fillers."""
    eye = torch.eye(D)
    others = eye[:10].sum(0)
    vis, names = [], []
    for i in range(4):
        vis.append(eye[i])
        names.append(("pivot", i))
    for i in range(10):
        for r in range(group):
            vis.append(-eye[i] + 0.01 * r * eye[(i + 1) % 10] + 0.1 * (others - eye[i]))
            names.append(("anti", i, r))
    for f in range(6):
        vis.append(-(0.2 + 0.03 * f) * others + eye[10 + f])  # distinct: no exact ties
        names.append(("filler", f))
    keys = torch.ones(len(vis), 2)
    keys[:4] *= torch.tensor([[9.0], [8.0], [7.0], [6.0]])  # L1 and L2 rank them the same way
    text, tkeys, after = [], [], []
    for j, d in enumerate(before_dirs):  # BOS / system prompt: before the image, largest keys
        text.append(eye[d])
        tkeys.append(torch.full((2,), 20.0 - j))
        after.append(False)
    for j, d in enumerate(after_dirs):
        text.append(eye[d])
        tkeys.append(torch.full((2,), 5.0 - 0.5 * j))
        after.append(True)
    text.append(torch.ones(D))  # a low-norm prompt token after the image: never a pivot
    tkeys.append(torch.full((2,), 0.1))
    after.append(True)
    x = dict(hidden=torch.stack(vis), keys=keys, text_hidden=torch.stack(text), text_keys=torch.stack(tkeys),
             text_after=torch.tensor(after))
    return x, names


def names_of(sel, names):
    return sorted(names[i] for i in kept(sel))


def test_k12_every_pivot_keeps_one_text_pivots_included():
    x, names = groups_case()
    sig = signals([x], [12], torch.ones(16))
    got = names_of(DARTScorer().select(sig), names)
    want = sorted([("pivot", i) for i in range(4)] + [("anti", i, 0) for i in range(8)])
    assert got == want  # 4 visual pivots + the one least similar token of each of the 8 pivots
    assert kept(DARTScorer().select(sig)) == ref_of(x, 12, torch.ones(16))


def test_k64_split_eight_per_visual_pivot_seven_per_text_pivot():
    x, names = groups_case(group=8)
    sig = signals([x], [64], torch.ones(16))
    got = names_of(DARTScorer().select(sig), names)
    # 64 = 4 visual pivots + 60 picks = 4 x 8 (visual pivots, visited first) + 4 x 7 (text pivots)
    want = [("pivot", i) for i in range(4)] + [("anti", i, r) for i in range(4) for r in range(8)]
    want += [("anti", i, r) for i in range(4, 8) for r in range(7)]
    assert got == sorted(want)
    assert kept(DARTScorer().select(sig)) == ref_of(x, 64, torch.ones(16))


def test_text_pivots_come_only_from_tokens_after_the_image():
    # e_8, e_9 are BOS / system-prompt tokens before the image with the largest text keys
    x, names = groups_case(after_dirs=(4, 5, 6, 7), before_dirs=(8, 9))
    sig = signals([x], [12], torch.ones(16))
    got = names_of(DARTScorer().select(sig), names)
    assert got == sorted([("pivot", i) for i in range(4)] + [("anti", i, 0) for i in range(8)])
    # the former behaviour (opt-in): the before-image tokens become pivots
    allrows = names_of(DARTScorer(text_pivots="all").select(sig), names)
    assert ("anti", 8, 0) in allrows and ("anti", 9, 0) in allrows
    # fewer than pivot_text tokens after the image: all of them are pivots (6 pivots, 8 picks)
    x2, names2 = groups_case(after_dirs=(4, 5), before_dirs=(8, 9))
    got2 = names_of(DARTScorer().select(signals([x2], [12], torch.ones(16))), names2)
    assert not {("anti", 8, 0), ("anti", 9, 0)} & set(got2)
    assert {("anti", 4, 0), ("anti", 5, 0)} <= set(got2)
    assert kept(DARTScorer().select(signals([x2], [12], torch.ones(16)))) == ref_of(x2, 12, torch.ones(16))


def test_final_norm_weight_changes_the_kept_set():
    # one visual pivot p = (1, 1) (largest key); a = (-1, 0.3); b = (0.2, -1); filler c = (1, 1.1).
    # raw:           cos(p, a) = -0.474, cos(p, b) = -0.555 -> b is the least similar
    # weight (1, .1): cos(p', a') = -0.992, cos(p', b') = 0.845 -> a is the least similar
    h = torch.tensor([[1.0, 1.0], [-1.0, 0.3], [0.2, -1.0], [1.0, 1.1]])
    keys = torch.tensor([[5.0, 5.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    w = torch.tensor([1.0, 0.1])
    sig = make_signals([4], [2], text_counts=[0], hidden=[h], keys=[keys], normed_hidden=[torch_rms(h, w)],
                       text_hidden=[torch.zeros(0, 2)], text_keys=[torch.zeros(0, 2)],
                       normed_text_hidden=[torch.zeros(0, 2)], text_after=[torch.zeros(0, dtype=torch.bool)])
    assert kept(DARTScorer(pivot_image=1).select(sig)) == [0, 1]  # released: cosine after the final norm
    assert kept(DARTScorer(pivot_image=1, final_norm=False).select(sig)) == [0, 2]  # norm skipped (opt-in)
    x = dict(hidden=h, keys=keys, text_hidden=torch.zeros(0, 2), text_keys=torch.zeros(0, 2),
             text_after=torch.zeros(0, dtype=torch.bool))
    assert ref_of(x, 2, w, pivot_image=1) == [0, 1] and ref_of(x, 2, None, pivot_image=1) == [0, 2]


def test_final_norm_changes_random_selections():
    """On random inputs a non-unit norm weight changes the kept set for most seeds; the scorer
    follows the normed reference every time."""
    changed = 0
    for seed in range(8):
        w = torch.rand(16, generator=torch.Generator().manual_seed(seed)) * 3 + 0.05
        x = sample(50 + seed, n=64, T=8, after=4)
        got = kept(DARTScorer().select(signals([x], [16], w)))
        assert got == ref_of(x, 16, w)
        changed += got != ref_of(x, 16, None)
    assert changed >= 4


# ----------------------------------------------------------------------------- through the runtime


class Capture(DARTScorer):
    """DART that records the signals it receives (and also asks for the raw text hidden states)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.needs = frozenset(self.needs | {"text_hidden"})
        self.seen = []

    def select(self, sig):
        self.seen.append(sig)
        return super().select(sig)


def _llava_with_trained_norm():
    import tiny_models as tm

    model = tm.tiny_llava(seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm = model.model.language_model.norm
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 2.5 + 0.1)
    return model


def _segments(ids, mask, image_id):
    """Per sample: list of (first, last) positions of each image run, and the text positions."""
    out = []
    for b in range(ids.shape[0]):
        pos = [j for j in range(ids.shape[1]) if mask[b, j]]
        img = [j for j in pos if int(ids[b, j]) == image_id]
        runs = []
        for j in img:
            if runs and j == runs[-1][1] + 1:
                runs[-1][1] = j
            else:
                runs.append([j, j])
        out.append(([tuple(r) for r in runs], [j for j in pos if int(ids[b, j]) != image_id]))
    return out


def test_runtime_signals_text_after_and_final_norm_follow_the_released_rule():
    """Through apply_pruning on a tiny LLaVA (left-padded batch: 1 image after 3 text tokens,
    2 images with text between, a text-only sample): ``text_after`` marks exactly the text after
    each image, ``normed_hidden`` is the model's final norm of ``hidden``, and the kept tokens equal
    the reference computed from the raw signals, the sequence layout and the norm weight."""
    import tiny_models as tm
    import vtoken

    model = _llava_with_trained_norm()
    inputs = tm.llava_inputs(model, [3, 6, 5], [1, 2, 0], [4, 2, 3], pad_side="left")
    k = 13
    scorer = Capture()
    with vtoken.apply_pruning(model, plan=[Stage(layer=2, scorer=scorer, keep=k)]) as h:
        with torch.no_grad():
            model(**inputs)
        stats = h.stats
    (sig,) = scorer.seen
    norm = model.model.language_model.norm
    torch.testing.assert_close(sig.normed_hidden, norm(sig.hidden))
    torch.testing.assert_close(sig.normed_text_hidden, norm(sig.text_hidden))
    layout = _segments(inputs["input_ids"], inputs["attention_mask"].bool(), tm.IMAGE_ID)
    s = 0
    for b, (runs, text_pos) in enumerate(layout):
        for ordinal, (first, last) in enumerate(runs):
            assert int(sig.sample[s]) == b
            T = len(text_pos)
            assert sig.text_mask[s].sum() == T
            want_after = [p > last for p in text_pos]
            assert sig.text_after[s, :T].tolist() == want_after
            assert not sig.text_after[s, T:].any()
            n = last - first + 1
            x = dict(hidden=sig.hidden[s, :n], keys=sig.keys[s, :n], text_hidden=sig.text_hidden[s, :T],
                     text_keys=sig.text_keys[s, :T], text_after=torch.tensor(want_after))
            want = ref_of(x, k, norm.weight.detach(), eps=norm.variance_epsilon)
            assert sig.index[s, :n].tolist() == list(range(n))
            assert kept_from_stats(stats, b, ordinal) == want
            s += 1
    assert s == sig.num_segments == 3


def kept_from_stats(stats, b, ordinal):
    """Kept indices within segment ``ordinal`` of sample ``b`` (stats index a sample's visual tokens)."""
    seg = stats.segments[b][ordinal]
    return sorted(int(i) - seg.offset for i in stats.stages[-1].kept[b] if seg.offset <= int(i) < seg.offset + seg.length)


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_runtime_batch_with_padding_equals_per_sample(pad_side):
    """A padded batch (plain forward: a left-padded row's model positions start at its padding
    count) keeps per sample what the sample alone keeps; the key signals are those of the sample
    alone (rotary phase of its own positions), and the sample alone follows the released rule."""
    import tiny_models as tm
    from conftest import slice_sample
    import vtoken

    model = _llava_with_trained_norm()
    inputs = tm.llava_inputs(model, [3, 6, 5], [1, 2, 0], [4, 2, 3], pad_side=pad_side)
    batch_scorer = Capture()
    with vtoken.apply_pruning(model, plan=[Stage(layer=2, scorer=batch_scorer, keep=10)]) as h:
        with torch.no_grad():
            model(**inputs)
        batch = h.stats
    (bsig,) = batch_scorer.seen
    for b in range(2):  # the samples with images
        single = slice_sample(inputs, b, model)
        scorer = Capture()
        with vtoken.apply_pruning(model, plan=[Stage(layer=2, scorer=scorer, keep=10)]) as h:
            with torch.no_grad():
                model(**single)
            one = h.stats
        assert len(one.segments[0]) == len(batch.segments[b]) == b + 1
        for ordinal in range(len(one.segments[0])):
            assert kept_from_stats(batch, b, ordinal) == kept_from_stats(one, 0, ordinal)
        # and the single sample follows the released rule on its own signals
        (sig,) = scorer.seen
        norm = model.model.language_model.norm
        for s in range(sig.num_segments):
            n, T = int(sig.mask[s].sum()), int(sig.text_mask[s].sum())
            sb = int((bsig.sample < b).sum()) + s  # the same segment in the batch
            torch.testing.assert_close(bsig.keys[sb, :n], sig.keys[s, :n], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(bsig.text_keys[sb, :T], sig.text_keys[s, :T], rtol=1e-4, atol=1e-4)
            assert bsig.text_after[sb, :T].tolist() == sig.text_after[s, :T].tolist()
            x = dict(hidden=sig.hidden[s, :n], keys=sig.keys[s, :n], text_hidden=sig.text_hidden[s, :T],
                     text_keys=sig.text_keys[s, :T], text_after=sig.text_after[s, :T])
            assert kept_from_stats(one, 0, s) == ref_of(x, 10, norm.weight.detach(), eps=norm.variance_epsilon)
