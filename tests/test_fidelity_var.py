"""VAR against a per-sample reference written from the authors' released code.

Released code followed: github.com/seilk/VisAttnSink @ 98e62d6ca74cf721daede708146d73d400ef501a,
``src/logic/logic.py`` (``DimProspector.run_logic``, ``HeadFork.run_logic``,
``VARProcessor.attn_redist``; defaults tau=20, rho=0.5, summ=0.2, p=0.6 of ``LogicEngine.activate``)
and ``src/logic/constants.py`` (``DIM_SINK``: two fixed sink dimensions per LLM). The rule:

* sinks: tokens whose |RMSNorm(h)| (no weight, eps 1e-6) exceeds tau in one of the sink dims;
  visual sinks are those inside the image, text sinks all the others;
* a head is image-centric for a query when the image has a visual sink and
  sum(attn on visual sinks) / sum(image attn + 1e-6) <= rho and sum(image attn) >= summ;
* in such a head the sinks' attention is scaled by p and (1 - p) of the attention the visual
  and text sinks had is added to the non-sink visual tokens, in proportion to their attention.

VAR redistributes attention inside the forward pass; it does not prune. vtoken's use of it
as a pruning score (``VARScorer``) is: the redistributed row of the last prompt token averaged
over the image-centric heads (all heads when none is), visual sinks ranked last. The reference
below computes the released redistribution and then that documented score, in float64 numpy.
"""

import numpy as np
import pytest
import torch

from vtoken.scorers import VARScorer
from vtoken.scorers.testing import make_signals

DIMS = [37, 401]  # fixed sink dimensions, as DIM_SINK gives them per model
D = 512  # |RMSNorm(h)_d| <= sqrt(D): tau = 20 needs D > 400


def rms_abs(h):
    h = np.asarray(h, np.float64)
    return np.abs(h / np.sqrt((h * h).mean(axis=-1, keepdims=True) + 1e-6))


def ref_kept(attn, attn_text, hidden, text_hidden, k, tau=20.0, rho=0.5, summ=0.2, p=0.6):
    attn = np.asarray(attn, np.float64)  # (H, n): the query's attention to the image tokens
    attn_text = np.asarray(attn_text, np.float64)  # (H, T): to the other tokens
    vis = rms_abs(hidden)[:, DIMS].max(axis=1) > tau
    txt = rms_abs(text_hidden)[:, DIMS].max(axis=1) > tau
    H, n = attn.shape
    rows, forked = [], []
    for h in range(H):
        image_attn = attn[h]
        fork = False
        if vis.any():  # HeadFork: no visual sink, no forked head
            portion = image_attn[vis].sum() / (image_attn + 1e-6).sum()
            fork = portion <= rho and image_attn.sum() >= summ
        row = image_attn.copy()
        if fork:  # attn_redist
            copied = image_attn.copy()
            row[vis] *= p
            budget = copied[vis].sum() * (1 - p) + attn_text[h][txt].sum() * (1 - p)
            copied[vis] = 0.0
            row += budget * copied / copied.sum()
        rows.append(row)
        forked.append(fork)
    use = [h for h in range(H) if forked[h]] or list(range(H))
    score = np.mean([rows[h] for h in use], axis=0)
    order = sorted(range(n), key=lambda i: (bool(vis[i]), -score[i], i))  # sinks last
    return sorted(order[:k]), int(vis.sum()), sum(forked)


def segment(seed, n, T, H=6, vis_sinks=3, txt_sinks=1):
    """One segment with planted massive activations and heads of every kind."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=g)
    text_hidden = torch.randn(T, D, generator=g)
    vs = torch.randperm(n, generator=g)[:vis_sinks]
    ts = torch.randperm(T, generator=g)[:txt_sinks]
    for rows, x in ((vs, hidden), (ts, text_hidden)):
        for r in rows.tolist():
            x[r, DIMS[r % 2]] = 1000.0 * (0.9 + 0.6 * torch.rand(1, generator=g).item())
    logits = torch.randn(H, n + T, generator=g) * 1.5
    logits[:, n:] += torch.linspace(-2, 4, H).unsqueeze(1)  # some heads look at the text (image sum < summ)
    sink_bias = torch.linspace(0, 6, H)[torch.randperm(H, generator=g)]
    logits[:, vs] += sink_bias.unsqueeze(1)  # some heads are sink-dominated (portion > rho)
    logits[:, n + ts] += 2.0
    row = torch.softmax(logits, dim=-1)
    return dict(attn=row[:, :n], attn_text=row[:, n:], hidden=hidden, text_hidden=text_hidden)


def signals(segs, budgets):
    return make_signals([x["hidden"].shape[0] for x in segs], budgets,
                        text_counts=[x["text_hidden"].shape[0] for x in segs],
                        attn_last=[x["attn"] for x in segs], attn_last_text=[x["attn_text"] for x in segs],
                        hidden=[x["hidden"] for x in segs], text_hidden=[x["text_hidden"] for x in segs])


def ref_of(x, k):
    return ref_kept(x["attn"].numpy(), x["attn_text"].numpy(), x["hidden"].numpy(), x["text_hidden"].numpy(), k)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dims", [DIMS, None])
def test_kept_sets_match_reference_on_ragged_batches(seed, dims):
    """dims=None (vtoken detects the sink dims from the data) finds the planted DIMS here."""
    segs = [segment(10 * seed, 40, 9), segment(10 * seed + 1, 23, 5, vis_sinks=1),
            segment(10 * seed + 2, 57, 12, vis_sinks=0, txt_sinks=2), segment(10 * seed + 3, 31, 7, vis_sinks=5)]
    budgets = [[10, 5, 20, 30], [39, 1, 8, 3], [2, 22, 56, 12]][seed % 3]
    sig = signals(segs, budgets)
    sel = VARScorer(dims=dims).select(sig)
    forked_seen = 0
    for s, (x, k) in enumerate(zip(segs, budgets)):
        want, sinks, forked = ref_of(x, k)
        assert sel.keep[s].nonzero().flatten().tolist() == want, s
        assert int(sig.diagnostics["sinks"][s]) == sinks
        assert int(sig.diagnostics["image_heads"][s]) == forked
        forked_seen += forked
    assert forked_seen > 0  # the redistribution ran somewhere


def test_no_visual_sink_no_redistribution():
    """Text sinks alone fork no head in the released code: the score is the plain head mean."""
    x = segment(3, 30, 8, vis_sinks=0, txt_sinks=2)
    sig = signals([x], [10])
    sel = VARScorer(dims=DIMS).select(sig)
    assert int(sig.diagnostics["image_heads"][0]) == 0
    torch.testing.assert_close(sel.scores[0], x["attn"].mean(dim=0))


def test_sink_portion_denominator_adds_1e6_per_visual_token():
    """HeadFork divides by sum(image_attn + 1e-6): 1e-6 per visual token. A head whose sink
    portion lies between the two readings is image-centric only under the released one."""
    n = 100
    hidden = torch.randn(n, D, generator=torch.Generator().manual_seed(0))
    hidden[0, DIMS[0]] = 1000.0
    s = 0.25 + 2.5e-5  # sink attention: s / (0.5 + 1e-4) <= 0.5 < s / (0.5 + 1e-6)
    attn = torch.full((1, n), (0.5 - s) / (n - 1), dtype=torch.float64)
    attn[0, 0] = s
    x = dict(attn=attn, attn_text=torch.full((1, 4), 0.125), hidden=hidden, text_hidden=torch.randn(4, D))
    assert ref_of(x, 10)[2] == 1
    sig = signals([x], [10])
    VARScorer(dims=DIMS).select(sig)
    assert int(sig.diagnostics["image_heads"][0]) == 1
