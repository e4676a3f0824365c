"""DART's batched selection against the former per-segment loop, and its host syncs.

``_loop_select`` below is the per-segment selection ``DARTScorer.select`` used before it was
batched (one Python iteration, several host syncs and ~200 small tensor ops per segment), kept
here verbatim as the reference: the batched selection must keep exactly the same tokens (ties
included: duplicated rows, equal cosines, equal key norms) and give the same heatmap scores, on
ragged batches with budgets <= 0, budgets >= the candidate count, empty segments, no pivot at
all (key-norm fallback), text pivots present or not.

Ties are made exact (``tied_rows``): with Gaussian features the cosine of a duplicated row
depends on its position in the matrix-vector kernel (last-bit differences, in the former loop
as in the batched product), so such "ties" are not ties and could flip either way.
"""

import pytest
import torch

from conftest import count_syncs
from vtoken.scorers import DARTScorer
from vtoken.scorers import functional as F
from vtoken.scorers.base import masked_scores, topk_mask
from vtoken.scorers.testing import make_signals


# ----------------------------------------------------------------------------- the former loop


def _top(x, k):
    return torch.sort(x, descending=True, stable=True).indices[:k]


def _loop_select(self, sig):
    """(keep, scores) of the former per-segment ``DARTScorer.select`` (``self``: its options)."""
    S, n = sig.mask.shape
    dev = sig.mask.device
    feats = sig.normed_hidden if self.final_norm else sig.hidden
    keep = torch.zeros_like(sig.mask)
    dup = torch.full((S, n), float("-inf"), dtype=torch.float32, device=dev)
    knorm = sig.keys.float().norm(p=self.key_norm, dim=-1).masked_fill(~sig.mask, float("-inf"))
    trows = self._text_rows(sig)
    if trows is not None:
        tfeats = sig.normed_text_hidden if self.final_norm else sig.text_hidden
        tnorm = sig.text_keys.float().norm(p=self.key_norm, dim=-1).masked_fill(~trows, float("-inf"))
        n_text = trows.sum(dim=1).tolist()
    for s in range(S):
        k = int(sig.budget[s])
        count = int(sig.mask[s].sum())
        if k <= 0:
            continue
        if k >= count:
            keep[s] = sig.mask[s]
            continue
        hv = feats[s]
        img_piv = _top(knorm[s], min(self.pivot_image, k))
        pivots = [hv[i] for i in img_piv.tolist()]
        if trows is not None and n_text[s]:
            pivots += [tfeats[s, i] for i in _top(tnorm[s], min(self.pivot_text, n_text[s])).tolist()]
        if not pivots:
            keep[s] = topk_mask(knorm[s:s + 1], sig.mask[s:s + 1], sig.budget[s:s + 1])[0]
            continue
        keep[s, img_piv] = True
        sims = torch.stack([F.cosine_to(hv, p) for p in pivots])
        dup[s] = sims.max(dim=0).values
        base, extra = divmod(k - len(img_piv), len(pivots))
        avail = sig.mask[s] & ~keep[s]
        for p in range(len(pivots)):
            take = base + (1 if p < extra else 0)
            if take == 0:
                break
            pick = _top((-sims[p]).masked_fill(~avail, float("-inf")), take)
            keep[s, pick] = True
            avail[pick] = False
    scores = torch.where(torch.isfinite(dup), -dup, torch.zeros_like(dup))
    return keep, masked_scores(scores, sig.mask)


# ----------------------------------------------------------------------------- random ragged sets


def tied_rows(c, D, g):
    """c rows with four entries +-1 (the rest 0; D >= 4): unit rows of entries +-0.5, whose
    cosines are multiples of 0.25, exact in float32 in any summation order -- so duplicated rows
    and equal cosines are exact ties, whatever kernel computes the similarities."""
    signs = torch.randint(0, 2, (c, 4), generator=g).float() * 2 - 1
    cols = torch.rand(c, D, generator=g).argsort(dim=1)[:, :4]
    return torch.zeros(c, D).scatter_(1, cols, signs)


def ragged_signals(seed, S, text=True, n_max=40, T_max=9, D=12, Dk=6):
    """Random ragged segments: empty ones, budgets from -1 to past the count, integer keys (many
    equal key norms), segments of ``tied_rows`` (many exactly equal cosines, duplicated rows) or
    of Gaussian rows, text rows after the image or not (``text=False``: no text signals at all)."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    counts = [randint(0, n_max) if randint(0, 7) else 0 for _ in range(S)]
    budgets = [randint(-1, c + 2) if randint(0, 5) else randint(1, 5) for c in counts]
    hidden, normed, keys = [], [], []
    w = torch.rand(D, generator=g) * 2 + 0.1
    for c in counts:
        tied = bool(randint(0, 1))
        h = tied_rows(c, D, g) if tied else torch.randn(c, D, generator=g)
        hidden.append(h)
        normed.append(h if tied else h * w)  # a non-unit norm weight would make the cosines inexact
        keys.append(torch.randint(-2, 3, (c, Dk), generator=g).float())  # many equal key norms
    kw = dict(hidden=hidden, normed_hidden=normed, keys=keys)
    if not text:
        return make_signals(counts, budgets, **kw)
    tcounts = [randint(0, T_max) for _ in range(S)]
    th = [tied_rows(t, D, g) for t in tcounts]
    kw.update(text_hidden=th, normed_text_hidden=th,
              text_keys=[torch.randint(-2, 3, (t, Dk), generator=g).float() for t in tcounts],
              text_after=[torch.rand(t, generator=g) < 0.6 for t in tcounts])
    return make_signals(counts, budgets, text_counts=tcounts, **kw)


OPTIONS = [dict(), dict(pivot_image=1, pivot_text=0), dict(pivot_image=0, pivot_text=3), dict(pivot_image=6),
           dict(pivot_image=2, pivot_text=5, key_norm=2), dict(text_pivots="all"), dict(final_norm=False),
           dict(pivot_image=0, pivot_text=2, text_pivots="all", final_norm=False)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("text", [True, False])
def test_batched_selection_equals_the_former_loop(options, text):
    scorer = DARTScorer(**options)
    for seed in range(25):
        sig = ragged_signals(1000 * seed + len(options), S=1 + seed % 13, text=text)
        keep, scores = _loop_select(scorer, sig)
        sel = scorer.select(sig)
        assert torch.equal(sel.keep, keep), (options, seed)
        torch.testing.assert_close(sel.scores, scores, rtol=1e-6, atol=1e-6)
        want = torch.minimum(sig.budget.clamp(min=0), sig.mask.sum(1))
        assert torch.equal(sel.keep.sum(1), want)


def test_batched_selection_equals_the_former_loop_on_clear_cut_cases():
    """Hand-made edge rows in one batch: budget 0, budget -3, budget == count, budget > count,
    an empty segment, budget < pivot_image, one text row after the image, none after it."""
    counts = [10, 10, 10, 10, 0, 10, 12, 12]
    budgets = [0, -3, 10, 11, 2, 3, 7, 7]
    tcounts = [3, 3, 3, 3, 3, 3, 4, 2]
    g = torch.Generator().manual_seed(7)
    hidden = [torch.randn(c, 8, generator=g) for c in counts]
    keys = [torch.randn(c, 4, generator=g) for c in counts]
    th = [torch.randn(t, 8, generator=g) for t in tcounts]
    after = [torch.tensor([False] * (t - 1) + [True]) for t in tcounts[:-1]] + [torch.zeros(2, dtype=torch.bool)]
    sig = make_signals(counts, budgets, text_counts=tcounts, hidden=hidden, normed_hidden=hidden, keys=keys,
                       text_hidden=th, normed_text_hidden=th, text_keys=[torch.randn(t, 4, generator=g) for t in tcounts],
                       text_after=after)
    for options in OPTIONS:
        scorer = DARTScorer(**options)
        keep, scores = _loop_select(scorer, sig)
        sel = scorer.select(sig)
        assert torch.equal(sel.keep, keep), options
        torch.testing.assert_close(sel.scores, scores, rtol=1e-6, atol=1e-6)
    assert DARTScorer().select(sig).keep.sum(1).tolist() == [0, 0, 10, 10, 0, 3, 7, 7]


@pytest.mark.parametrize("options", [dict(), dict(pivot_image=0, pivot_text=2)])
def test_host_syncs_do_not_grow_with_the_segment_count(options):
    """The selection runs on all segments at once: its host syncs (the erank diagnostic's kept
    count included) are the same few for 2 segments as for 16."""
    def syncs(S):
        sig = ragged_signals(5, S=S, n_max=30)
        sig.budget = sig.mask.sum(1) // 2 + 1  # most segments take the pivot path
        return count_syncs(lambda: DARTScorer(**options).select(sig))

    two, sixteen = syncs(2), syncs(16)
    assert two == sixteen <= 2, (two, sixteen)
