"""Information-flow scorers (FlowCut, rollout) and sink redistribution (VAR)."""

import pytest
import torch

from vtoken.scorers import FlowCutScorer, RolloutScorer, VARScorer, attention_rollout
from vtoken.scorers.testing import make_signals


def kept(sel, s=0):
    return sel.keep[s].nonzero().flatten().tolist()


# ----------------------------------------------------------------------------- FlowCut


def test_flowcut_accumulates_over_layers():
    # layers [favour 0, favour 1, favour 1]: the running average (momentum 0.5) is
    # 0.25*l0 + 0.25*l1 + 0.5*l2 = [.275, .625, .1]
    l0 = torch.tensor([0.8, 0.1, 0.1])
    l1 = torch.tensor([0.1, 0.8, 0.1])
    layers = torch.stack([l0, l1, l1]).unsqueeze(1)  # (Lyr, H=1, n)
    sig = make_signals([3], [1], layer_attn_last=[layers])
    sc = FlowCutScorer(relay=False)
    assert sc.needs == frozenset({"layer_attn_last"}) and not sc.optional_needs
    sel = sc.select(sig)
    assert kept(sel) == [1]
    assert sig.diagnostics["relay"].tolist() == [False]
    want = 0.25 * l0 + 0.25 * l1 + 0.5 * l1
    torch.testing.assert_close(sel.scores[0], want)


def test_flowcut_cls_relay_starts_the_flow():
    l0 = torch.tensor([0.4, 0.35, 0.25]).view(1, 1, 3)
    cls = torch.tensor([0.0, 1.0, 0.0])
    sig = make_signals([3], [1], layer_attn_last=[l0], vision_attn=[cls])
    sc = FlowCutScorer()
    assert "vision_attn" in sc.optional_needs and "vision_attn" not in sc.needs
    assert "vision_attn" in FlowCutScorer(relay="require").needs
    sel = sc.select(sig)
    assert sig.diagnostics["relay"].tolist() == [True]
    assert kept(sel) == [1]  # 0.5*[0,1,0] + 0.5*[.4,.35,.25]
    torch.testing.assert_close(sel.scores[0], torch.tensor([0.2, 0.675, 0.125]))
    # without the relay the last-token flow alone picks token 0
    sig = make_signals([3], [1], layer_attn_last=[l0], vision_attn=[cls])
    assert kept(FlowCutScorer(relay=False).select(sig)) == [0]


# ----------------------------------------------------------------------------- rollout


def test_rollout_scorer_uses_indirect_paths():
    # sequence: v0 v1 t q (m = 4). At layer 0 the text token t reads only v1; at layer 1 the
    # query q reads t (and a little of v0). Directly q attends v0 more than v1, but through t
    # most of the flow into q comes from v1.
    A0 = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.25, 0.25, 0.25, 0.25],
    ])
    A1 = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.2, 0.0, 0.8, 0.0],
    ])
    full = torch.stack([A0, A1]).unsqueeze(0)
    sig = make_signals([2], [1], layer_attn_full=full, full_pos=torch.tensor([[0, 1]]), full_query=torch.tensor([3]))
    sel = RolloutScorer().select(sig)
    assert kept(sel) == [1]
    R = attention_rollout(full[0])
    torch.testing.assert_close(sel.scores[0], R[3, :2])


def test_rollout_reports_missing_signal():
    sig = make_signals([2], [1])
    with pytest.raises(ValueError, match="layer_attn_full"):
        RolloutScorer().select(sig)


# ----------------------------------------------------------------------------- VAR


def var_signals(n=8, D=1024, budget=2):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, D, generator=g)
    hidden[1, 33] = 500.0  # visual sink: massive activation in dim 33
    text_hidden = torch.randn(2, D, generator=g)
    text_hidden[0, 33] = 700.0  # BOS-like text sink in the same dimension
    # head 0: image-centric (much image attention, little on the sink)
    # head 1: sink-dominated (most of its image attention is on the sink) -> not image-centric
    a = torch.zeros(2, n)
    a[0] = torch.tensor([0.05, 0.05, 0.10, 0.30, 0.05, 0.05, 0.05, 0.05])
    a[1] = torch.tensor([0.02, 0.60, 0.02, 0.01, 0.02, 0.02, 0.20, 0.02])
    at = torch.tensor([[0.2, 0.1], [0.05, 0.04]])  # attention to the text tokens (sink = text 0)
    return make_signals([n], [budget], text_counts=[2], hidden=[hidden], text_hidden=[text_hidden],
                        attn_last=[a], attn_last_text=[at])


def test_var_detects_sink_and_uses_image_centric_heads():
    sig = var_signals()
    sc = VARScorer()
    vis, txt = sc.sinks(sig)
    assert vis[0].nonzero().flatten().tolist() == [1]
    assert txt[0].tolist() == [True, False]
    red, centric = sc.redistributed(sig, vis, txt)
    assert centric[0].tolist() == [True, False]
    # head 0: budget = 0.4 * (sink visual 0.05 + sink text 0.2) = 0.1, spread over non-sinks
    a0 = sig.attn_last[0, 0]
    non = a0.clone()
    non[1] = 0
    want = non + 0.1 * non / non.sum()
    want[1] = a0[1] * 0.6
    torch.testing.assert_close(red[0, 0], want)
    sel = sc.select(sig)
    # token 6 (loud only in the sink-dominated head) is not chosen; the sink is excluded
    assert kept(sel) == [2, 3]
    assert sig.diagnostics["sinks"].tolist() == [1]
    assert sig.diagnostics["image_heads"].tolist() == [1]


def test_var_sink_excluded_but_budget_exact_and_keep_sinks_option():
    sig = var_signals(budget=8)
    assert VARScorer().select(sig).keep.sum() == 8
    sig = var_signals(budget=1)
    assert kept(VARScorer(keep_sinks=True).select(sig)) == [1]
    sig = var_signals(budget=3)
    sel = VARScorer(dims=[5]).select(sig)  # fixed sink dims (VAR's per-model table): nothing in dim 5
    assert sig.diagnostics["sinks"].tolist() == [0]
    assert sel.keep.sum() == 3


def test_var_without_sinks_equals_mean_attention_of_centric_heads():
    g = torch.Generator().manual_seed(3)
    n = 6
    a = torch.softmax(torch.randn(3, n, generator=g), dim=-1) * 0.9
    sig = make_signals([n], [2], text_counts=[1], hidden=[torch.randn(n, 64, generator=g)],
                       text_hidden=[torch.randn(1, 64, generator=g)], attn_last=[a],
                       attn_last_text=[torch.full((3, 1), 0.1)])
    sel = VARScorer().select(sig)
    torch.testing.assert_close(sel.scores[0], a.mean(0))
