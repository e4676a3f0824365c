"""Sink rules of ``exclude_sinks`` and ``var`` (``sink_rule``): VAR's massive activations (the
default, unchanged), ACT's attention received (Yu et al., ICML 2024) and secondary sinks aligned
with the primary sink (Wong et al., arXiv:2512.22213), on hand-built activations and attention
whose sink sets are worked out by hand below."""

import pytest
import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import build_plan
from vtoken.scorers import FastVScorer, VARScorer
from vtoken.scorers import functional as F
from vtoken.scorers.testing import make_signals


def kept(sel, s=0):
    return sel.keep[s].nonzero().flatten().tolist()


# ----------------------------------------------------------------------------- ACT


def act_attention():
    """(H=2, T=3, n=4) attention of the text rows to 4 visual tokens. Row 0 precedes the image
    (causal: it sees none of it); rows 1 and 2 follow it.

    Averaged over the 2 rows that see the image:
      head 0: [(.05+.05)/2, (.30+.10)/2, (.05+.05)/2, (.02+.02)/2] = [.05, .20, .05, .02]
      head 1: [.02, .02, .02, (.15+.09)/2 = .12]
    > 0.1 in some head: token 1 (head 0) and token 3 (head 1). Averaging over all 3 rows would
    give token 3 only .08 -- the denominator is the rows that can see the token, as in ACT.
    """
    a = torch.zeros(2, 3, 4)
    a[0, 1] = torch.tensor([0.05, 0.30, 0.05, 0.02])
    a[0, 2] = torch.tensor([0.05, 0.10, 0.05, 0.02])
    a[1, 1] = torch.tensor([0.02, 0.02, 0.02, 0.15])
    a[1, 2] = torch.tensor([0.02, 0.02, 0.02, 0.09])
    return a


def act_signals(budget=2):
    # the last prompt token's own row puts most of its attention on the two ACT sinks
    last = torch.tensor([[0.10, 0.40, 0.05, 0.30], [0.06, 0.30, 0.10, 0.40]])  # head mean [.08 .35 .075 .35]
    return make_signals([4], [budget], text_counts=[3], attn_text=[act_attention()],
                        text_after=[torch.tensor([False, True, True])], attn_last=[last],
                        hidden=[torch.randn(4, 16, generator=torch.Generator().manual_seed(0))])


def test_act_rule_by_hand():
    sig = act_signals()
    got = F.act_sinks(sig.attn_text, sig.text_after, sig.mask)
    assert got[0].nonzero().flatten().tolist() == [1, 3]
    # threshold .15: only head 0's .20 passes
    assert F.act_sinks(sig.attn_text, sig.text_after, sig.mask, tau=0.15)[0].nonzero().flatten().tolist() == [1]
    # no text row after the image: no ACT sinks
    none_after = torch.zeros_like(sig.text_after)
    assert not F.act_sinks(sig.attn_text, none_after, sig.mask).any()


def test_fastv_excludes_act_sinks():
    # FastV alone keeps the two most attended tokens, 1 and 3 (head means .08 .35 .075 .35)
    assert kept(FastVScorer().select(act_signals())) == [1, 3]
    # VAR's rule finds no massive activation in these small random hidden states: unchanged
    assert kept(FastVScorer(exclude_sinks=True).select(act_signals())) == [1, 3]
    sc = FastVScorer(exclude_sinks=True, sink_rule="act")
    assert {"attn_text", "text_after"} <= sc.needs and "hidden" not in sc.needs and sc.sink_tau == 0.1
    sig = act_signals()
    assert kept(sc.select(sig)) == [0, 2]  # both sinks ranked last: the two others
    assert sig.diagnostics["sinks"].tolist() == [2]
    sig = act_signals()
    # threshold .15: token 1 is the only sink; 3 (.35) and 0 (.08) are kept
    assert kept(FastVScorer(exclude_sinks=True, sink_rule="act", sink_tau=0.15).select(sig)) == [0, 3]


# ----------------------------------------------------------------------------- secondary sinks


def secondary_signals(budget=2):
    """Text rows (sequence order): t0 = e0 (norm 1), t1 = 30 e1 + 5 e2 (norm 30.41, the largest
    of the first three: the primary sink p), t2 = e2 + e3 (norm 1.41), t3 = 100 e7 (largest of
    all, but outside the first-three window).

    Visual tokens and |cos| with p = (0, 30, 5, 0, ...):
      v0 = (0, 6, 1, 0, ...) = p / 5            -> 1      (sink)
      v1 = (0, -3, -.5, 0, ...) = -p / 10        -> 1      (sink: the rule takes |cos|)
      v2 = (0, 1, 0, 1, ...)                     -> 30 / (30.41 * 1.414) = .698
      v3 = 100 e7 (a huge norm, orthogonal to p) -> 0
    """
    D = 8
    text = torch.zeros(4, D)
    text[0, 0] = 1.0
    text[1, 1], text[1, 2] = 30.0, 5.0
    text[2, 2], text[2, 3] = 1.0, 1.0
    text[3, 7] = 100.0
    vis = torch.zeros(4, D)
    vis[0, 1], vis[0, 2] = 6.0, 1.0
    vis[1, 1], vis[1, 2] = -3.0, -0.5
    vis[2, 1], vis[2, 3] = 1.0, 1.0
    vis[3, 7] = 100.0
    # the last prompt token's attention favours the two secondary sinks
    last = torch.tensor([[0.35, 0.30, 0.10, 0.05], [0.30, 0.35, 0.05, 0.10]])
    last_text = torch.full((2, 4), 0.05)
    return make_signals([4], [budget], text_counts=[4], hidden=[vis], text_hidden=[text], attn_last=[last],
                        attn_last_text=[last_text])


def test_secondary_rule_by_hand():
    sig = secondary_signals()
    assert F.primary_sink(sig.text_hidden, sig.text_mask).tolist() == [1]
    got = F.secondary_sinks(sig.hidden, sig.mask, sig.text_hidden, sig.text_mask)
    assert got[0].nonzero().flatten().tolist() == [0, 1]
    got = F.secondary_sinks(sig.hidden, sig.mask, sig.text_hidden, sig.text_mask, cos=0.6)
    assert got[0].nonzero().flatten().tolist() == [0, 1, 2]  # .698 > .6
    # a window of 4 makes t3 the primary sink: then only v3 is aligned with it
    got = F.secondary_sinks(sig.hidden, sig.mask, sig.text_hidden, sig.text_mask, window=4)
    assert got[0].nonzero().flatten().tolist() == [3]


def test_fastv_excludes_secondary_sinks():
    assert kept(FastVScorer().select(secondary_signals())) == [0, 1]
    sc = FastVScorer(exclude_sinks=True, sink_rule="secondary")
    assert {"hidden", "text_hidden"} <= sc.needs and sc.sink_tau == 0.9
    sig = secondary_signals()
    assert kept(sc.select(sig)) == [2, 3]
    assert sig.diagnostics["sinks"].tolist() == [2]


# ----------------------------------------------------------------------------- VAR with the rules


def test_var_default_rule_unchanged_and_other_rules_pick_its_visual_sinks():
    sc = VARScorer()
    assert sc.sink_rule == "var" and sc.sink_tau == 20.0
    assert sc.needs == frozenset({"attn_last", "attn_last_text", "hidden", "text_hidden"})
    # secondary rule: v0 and v1 are VAR's visual sinks now (no massive activation anywhere here)
    sig = secondary_signals()
    vis, _ = VARScorer().sinks(sig)
    assert not vis.any()
    sc = VARScorer(sink_rule="secondary")
    sig = secondary_signals()
    vis, txt = sc.sinks(sig)
    assert vis[0].nonzero().flatten().tolist() == [0, 1] and not txt.any()
    assert kept(sc.select(sig)) == [2, 3]
    assert sig.diagnostics["sinks"].tolist() == [2]
    # ACT rule: adds the signals it reads; its sinks are 1 and 3
    sc = VARScorer(sink_rule="act")
    assert {"attn_text", "text_after"} <= sc.needs and sc.sink_tau == 0.1
    sig = act_signals()
    sig.text_hidden = torch.zeros(1, 3, 16)
    sig.attn_last_text = torch.zeros(1, 2, 3)
    vis, _ = sc.sinks(sig)
    assert vis[0].nonzero().flatten().tolist() == [1, 3]
    assert kept(sc.select(sig)) == [0, 2]


def test_sink_rule_through_presets_and_bad_rule():
    (st,) = build_plan("fastv", 8, exclude_sinks=True, sink_rule="act")
    assert st.scorer.sink_rule == "act" and "attn_text" in st.scorer.needs
    (st,) = build_plan("var", 8, sink_rule="secondary", sink_tau=0.8)
    assert st.scorer.sink_rule == "secondary" and st.scorer.sink_tau == 0.8 and st.scorer.tau == 20.0
    (st,) = build_plan("rollout", 8, exclude_sinks=True, sink_rule="secondary")
    assert "text_hidden" in st.scorer.needs
    with pytest.raises(PruningConfigError, match="sink_rule"):
        build_plan("fastv", 8, exclude_sinks=True, sink_rule="bogus")
