"""Attention flow (Abnar & Zuidema, ACL 2020): the maximum-flow solver against a textbook value,
brute-force minimum cuts and networkx's maximum flow on the paper's own graph construction; the
scorer's selection on hand-built signals; end to end against an independent eager run."""

import itertools

import pytest
import torch

import tiny_models as tm
import vtoken
from conftest import get_inputs, get_model
from vtoken.errors import PruningConfigError
from vtoken.methods import build_plan
from vtoken.plan import tokens_for
from vtoken.scorers import AttentionFlowScorer, RolloutScorer
from vtoken.scorers import functional as F
from vtoken.scorers.testing import make_signals


def causal_attention(layers, m, seed, sharp=2.0):
    """(layers, m, m) row-stochastic causal attention."""
    g = torch.Generator().manual_seed(seed)
    future = torch.triu(torch.full((m, m), float("-inf")), 1)
    return torch.softmax(torch.randn(layers, m, m, generator=g, dtype=torch.float64) * sharp + future, dim=-1)


def mixed(a, residual=0.5):
    """The paper's edge weights, written out: (A + I) / row sum for residual 0.5, in general
    (r I + (1 - r) A) / row sum."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    w = residual * eye + (1 - residual) * a
    return w / w.sum(dim=-1, keepdim=True)


def brute_force_flow(a, q, v, residual=0.5):
    """Max flow (0, v) -> (L, q) as the minimum cut (max-flow min-cut theorem), by enumerating
    which middle nodes (layers 1..L-1) sit on the source side."""
    w = mixed(a, residual)
    L, m, _ = w.shape
    middle = [(layer, i) for layer in range(1, L) for i in range(m)]
    best = float("inf")
    for bits in itertools.product([False, True], repeat=len(middle)):
        side = {(0, v)} | {node for node, b in zip(middle, bits) if b}
        cut = 0.0
        for (layer, j) in side:  # edges leaving the source side
            for i in range(m):
                head = (layer + 1, i)
                if layer + 1 == L and i != q:
                    continue  # top nodes other than q lead nowhere
                if head not in side:
                    cut += float(w[layer, i, j])
        best = min(best, cut)
    return best


def networkx_flows(a, q, sources, residual=0.5):
    """The authors' construction (attention_flow's get_adjmat / compute_flows): node (l, i),
    edges pointing down from (l, i) to (l - 1, j) with capacity A'_{l-1}[i, j] (zero entries
    give no edge), flow from the top node of the query down to each input node v of
    ``sources``; one value per source."""
    nx = pytest.importorskip("networkx")
    w = mixed(a, residual)
    L, m, _ = w.shape
    graph = nx.DiGraph()
    for layer in range(1, L + 1):
        for i in range(m):
            for j in range(m):
                if float(w[layer - 1, i, j]) > 0:
                    graph.add_edge((layer, i), (layer - 1, j), capacity=float(w[layer - 1, i, j]))
    flow = nx.algorithms.flow.edmonds_karp  # the released code's choice
    return [nx.maximum_flow_value(graph, (L, q), (0, v), flow_func=flow) for v in sources]


# ----------------------------------------------------------------------------- the solver


def test_max_flow_textbook_network():
    # Cormen et al., Introduction to Algorithms, Fig. 26.1: s=0, v1..v4=1..4, t=5; max flow 23
    edges = [(0, 1, 16), (0, 2, 13), (1, 3, 12), (2, 1, 4), (2, 4, 14), (3, 2, 9), (3, 5, 20), (4, 3, 7), (4, 5, 4)]
    assert F.max_flow(6, edges, 0, 5) == pytest.approx(23.0)
    assert F.max_flow(6, edges, 5, 0) == 0.0  # nothing flows backwards
    # s=0 -> a=1, b=2 -> c=3, d=4 -> t=5, unit capacities, a listing c first: the first shortest
    # path s-a-c-t blocks b; the maximum (2: s-a-d-t and s-b-c-t) needs the residual edge c -> a
    edges = [(0, 1, 1), (0, 2, 1), (1, 3, 1), (1, 4, 1), (2, 3, 1), (3, 5, 1), (4, 5, 1)]
    assert F.max_flow(6, edges, 0, 5) == 2.0


@pytest.mark.parametrize("layers,m", [(3, 3), (3, 5), (4, 3), (4, 4)])
def test_attention_flow_equals_brute_force_min_cut(layers, m):
    a = causal_attention(layers, m, seed=10 * layers + m)
    got = F.attention_flow(a.unsqueeze(0).float(), torch.tensor([m - 1]), torch.arange(m).unsqueeze(0))
    want = torch.tensor([brute_force_flow(a, m - 1, v) for v in range(m)], dtype=torch.float64)
    torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
@pytest.mark.parametrize("residual", [0.5, 0.2])
def test_attention_flow_equals_networkx_on_the_papers_graph(layers, residual):
    # two samples of one padded batch: sample 1 is left-padded by 3 (its rows/columns zero)
    m = 9
    a0 = causal_attention(layers, m, seed=layers)
    a1 = torch.zeros(layers, m, m, dtype=torch.float64)
    a1[:, 3:, 3:] = causal_attention(layers, m - 3, seed=layers + 50)
    attn = torch.stack([a0, a1]).float()
    sources = torch.tensor([[0, 2, 5, 7, -1, -1], [3, 4, 5, 6, 7, -1]])
    got = F.attention_flow(attn, torch.tensor([m - 1, m - 1]), sources, residual=residual)
    for s, a in enumerate((a0, a1[:, 3:, 3:])):
        real = sources[s] >= 0
        assert (got[s][~real] == 0).all()
        want = networkx_flows(a.float().double(), a.shape[-1] - 1, (sources[s][real] - 3 * s).tolist(), residual)
        assert got[s][real].tolist() == pytest.approx(want, rel=1e-5, abs=1e-7), s


def test_two_layer_flow_by_hand_differs_from_rollout():
    # tokens v0 v1 t q. Layer 0: t reads v0 only, q reads v1 a little (0.16);
    # layer 1: q reads t (0.2) and itself (0.8). With A' = 0.5 A + 0.5 I:
    #   A'_0[t] = [.5, 0, .5, 0], A'_0[q] = [0, .08, 0, .92], A'_1[q] = [0, 0, .1, .9]
    # flow (paths v -> j -> q, capacity min of the two edges):
    #   v0: min(.5, .1) + min(0, .9) = .10      v1: min(0, .1) + min(.08, .9) = .08
    # rollout (sum of products): v0: .1 * .5 = .05,   v1: .9 * .08 = .072
    A0 = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [1.0, 0, 0, 0], [0, 0.16, 0, 0.84]])
    A1 = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0.2, 0.8]])
    full = torch.stack([A0, A1]).unsqueeze(0)
    signals = dict(layer_attn_full=full, full_pos=torch.tensor([[0, 1]]), full_query=torch.tensor([3]))
    sel = AttentionFlowScorer().select(make_signals([2], [1], **signals))
    torch.testing.assert_close(sel.scores[0], torch.tensor([0.10, 0.08]))
    assert sel.keep[0].tolist() == [True, False]
    rolled = RolloutScorer().select(make_signals([2], [1], **signals))
    torch.testing.assert_close(rolled.scores[0], torch.tensor([0.05, 0.072]))
    assert rolled.keep[0].tolist() == [False, True]


def test_three_layer_selection_matches_min_cut_reference():
    # 6 tokens [v0 v1 v2 v3 t q]: the scorer keeps the 2 visual tokens of largest min-cut value
    m = 6
    a = causal_attention(3, m, seed=7, sharp=3.0)
    sig = make_signals([4], [2], layer_attn_full=a.float().unsqueeze(0), full_pos=torch.tensor([[0, 1, 2, 3]]),
                       full_query=torch.tensor([m - 1]))
    sel = AttentionFlowScorer().select(sig)
    want = torch.tensor([brute_force_flow(a, m - 1, v) for v in range(4)], dtype=torch.float64)
    assert sel.keep[0].nonzero().flatten().tolist() == sorted(want.topk(2).indices.tolist())
    torch.testing.assert_close(sel.scores[0].double(), want, rtol=1e-5, atol=1e-6)


def test_size_limit_from_three_layers_and_plan():
    a = causal_attention(3, 8, seed=1).float().unsqueeze(0)
    sig = dict(layer_attn_full=a, full_pos=torch.tensor([[0, 1, 2]]), full_query=torch.tensor([7]))
    with pytest.raises(PruningConfigError, match="max_tokens=4"):
        AttentionFlowScorer(max_tokens=4).select(make_signals([3], [1], **sig))
    assert AttentionFlowScorer(max_tokens=None).select(make_signals([3], [1], **sig)).keep.sum() == 1
    # two layers are exact in closed form: no limit applies
    sig2 = dict(sig, layer_attn_full=a[:, :2])
    assert AttentionFlowScorer(max_tokens=4).select(make_signals([3], [1], **sig2)).keep.sum() == 1
    (st,) = build_plan("attnflow", 16)
    assert st.layer == 2 and isinstance(st.scorer, AttentionFlowScorer) and st.scorer.residual == 0.5
    (st,) = build_plan("attnflow", 16, K=3, max_tokens=None, debias=True)
    assert st.layer == 3 and st.scorer.max_tokens is None and st.scorer.debias
    with pytest.raises(PruningConfigError, match="K >= 1"):
        build_plan("attnflow", 16, K=0)
    with pytest.raises(ValueError, match="layer_attn_full"):
        AttentionFlowScorer().select(make_signals([2], [1]))


# ----------------------------------------------------------------------------- end to end


def _reference_kept(model, inputs, stats, keep, K):
    """Per sample, the visual ordinals an independent computation keeps: an eager run's
    attentions (output_attentions=True) at layers 0..K-1, heads averaged, restricted to the
    sample's real tokens; networkx's max flow from the last token at the top down to each visual
    token; the top ``keep`` of each image."""
    ref = tm.tiny_llava(attn="eager")
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        att = ref(**inputs, output_attentions=True).attentions
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    out = []
    for b in range(ids.shape[0]):
        real = mask[b].nonzero().flatten()
        a = torch.stack([att[layer][b].mean(0)[real][:, real] for layer in range(K)]).double()
        visual = torch.nonzero(ids[b, real] == tm.IMAGE_ID).flatten()
        kept = []
        for seg in stats.segments[b]:
            cols = visual[seg.offset: seg.offset + seg.length].tolist()
            flows = torch.tensor(networkx_flows(a, len(real) - 1, cols))
            kept += (seg.offset + flows.topk(tokens_for(keep, seg.count)).indices).tolist()
        out.append(sorted(kept))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("K", [2, 3])
def test_attnflow_end_to_end_matches_networkx_on_eager_attention(K):
    pytest.importorskip("networkx")
    model = get_model("llava")
    inputs = get_inputs("llava", model)  # 3 samples: 1, 2 and 0 images, left padding
    keep = 0.3
    with vtoken.apply_pruning(model, method="attnflow", keep=keep, K=K) as h:
        with torch.no_grad():
            model(**inputs)
        stats = h.stats
    got = [k.tolist() for k in stats.stages[0].kept]
    assert stats.stages[0].layer == K
    assert got == _reference_kept(model, inputs, stats, keep, K)


def test_attnflow_size_limit_end_to_end():
    model = get_model("llava")
    inputs = get_inputs("llava", model)  # samples of up to 84 tokens
    with vtoken.apply_pruning(model, method="attnflow", keep=0.3, K=3, max_tokens=40):
        with pytest.raises(PruningConfigError, match="max_tokens=40"), torch.no_grad():
            model(**inputs)
    with vtoken.apply_pruning(model, method="attnflow", keep=0.3, K=2, max_tokens=40) as h:
        with torch.no_grad():  # two layers: closed form, no limit
            model(**inputs)
        assert h.stats.stages[0].layer == 2
