"""Attention rollout and FlowCut against per-sample plain-loop references.

Rollout: the reference is written from the authors' released ``compute_joint_attention``
(samiraabnar/attention_flow@8044f53, ``attention_graph_util.py``): with ``add_residual`` the
identity is added to each layer's (head-averaged) attention and every row divided by its sum,
A'_l = (A_l + I) / rowsum; the joint attention of layer l is A'_l @ joint_(l-1), starting from
joint_0 = A'_0. A visual token's score is its column in the query's row of the last layer's
joint attention. ``add_residual=False`` is vtoken's ``residual=0``.

FlowCut: the released rule (TungChintao/FlowCut@a2ecd24, ``flowcut/modeling_clip_flowcut.py``,
``CLIPEncoderLayer_forward``) starts the cumulative score at the first scored layer's score and
then runs cumulative = 0.5 * cumulative + 0.5 * score at every later layer. vtoken keeps that
accumulation but scores each layer by the last prompt token's normalised head-mean attention
(optionally preceded by the vision encoder's relay attention) instead of the released
``(a_cls / sum + s / sum) * ||v||_1`` inside the CLIP encoder -- a documented deviation (the
signals a scorer gets carry no encoder values; see docs/FIDELITY.md). The reference below is
the released accumulation on vtoken's per-layer scores.

Both references break ties towards the lower candidate slot, as vtoken documents.
"""

import numpy as np
import pytest
import torch

from vtoken.scorers import FlowCutScorer, RolloutScorer
from vtoken.scorers.testing import make_signals, random_signals


def kept(sel, s):
    return sel.keep[s].nonzero().flatten().tolist()


def top(scores, k):
    """Indices (sorted) of the k largest scores, ties to the lower index."""
    order = sorted(range(len(scores)), key=lambda v: (-scores[v], v))
    return sorted(order[:k])


# ----------------------------------------------------------------------------- rollout


def released_joint_attention(att, add_residual=True):
    """compute_joint_attention of the released code, in plain numpy loops: att (L, m, m)."""
    att = np.asarray(att, dtype=np.float64)
    L, m, _ = att.shape
    aug = np.zeros_like(att)
    for layer in range(L):
        for i in range(m):
            row = att[layer, i] + (np.eye(m)[i] if add_residual else 0.0)
            aug[layer, i] = row / row.sum() if add_residual else row
    joint = aug[0]
    for layer in range(1, L):
        joint = aug[layer] @ joint
    return joint


def ref_rollout_kept(full, pos, query, count, budget, add_residual=True):
    """Kept candidate slots of one segment: full (L, M, M) head-averaged (zero-padded beyond the
    sample's tokens), pos (count,) column of each candidate, query row."""
    used = int((np.asarray(full).sum(axis=(0, 2)) > 0).sum())  # tokens of the sample (no padding)
    joint = released_joint_attention(np.asarray(full)[:, :used, :used], add_residual)
    scores = [float(joint[query, int(pos[j])]) for j in range(count)]
    return top(scores, min(budget, count))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_rollout_matches_released_joint_attention_on_ragged_batches(seed, layers):
    counts, budget = [9, 4, 12, 1], [3, 4, 5, 1]
    x = random_signals(counts, budget, text_counts=[2, 5, 1, 3], layers=layers, seed=seed)
    sel = RolloutScorer().select(make_signals(**x))
    for s, c in enumerate(counts):
        want = ref_rollout_kept(x["layer_attn_full"][s].numpy(), x["full_pos"][s].numpy(), int(x["full_query"][s]),
                                c, budget[s])
        assert kept(sel, s) == want, s


@pytest.mark.parametrize("seed", range(3))
def test_rollout_renormalises_rows_that_do_not_sum_to_one(seed):
    """Rows scaled below 1 (attention restricted to part of a sequence): the released code
    renormalises A + I row by row, which is not 0.5 (A + I)."""
    counts, budget = [9, 12], [3, 5]
    x = random_signals(counts, budget, layers=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x["layer_attn_full"] = x["layer_attn_full"] * (0.05 + 0.95 * torch.rand(x["layer_attn_full"].shape[:-1], generator=g)).unsqueeze(-1)
    sel = RolloutScorer().select(make_signals(**x))
    for s, c in enumerate(counts):
        want = ref_rollout_kept(x["layer_attn_full"][s].numpy(), x["full_pos"][s].numpy(), int(x["full_query"][s]),
                                c, budget[s])
        assert kept(sel, s) == want, s


@pytest.mark.parametrize("seed", range(2))
def test_rollout_without_residual_is_add_residual_false(seed):
    counts, budget = [7, 10], [2, 6]
    x = random_signals(counts, budget, layers=2, seed=seed)
    sel = RolloutScorer(residual=0.0).select(make_signals(**x))
    for s, c in enumerate(counts):
        want = ref_rollout_kept(x["layer_attn_full"][s].numpy(), x["full_pos"][s].numpy(), int(x["full_query"][s]),
                                c, budget[s], add_residual=False)
        assert kept(sel, s) == want


def test_rollout_batch_equals_each_sample_alone_and_ties_to_lower_slot():
    # one layer, m = 5: v0 v1 v2 t q; q spreads its attention evenly over v0, v1, v2, q, so the
    # three visual tokens tie exactly (0.5 * 0.25 each); budget 2 keeps slots 0 and 1
    A = torch.zeros(1, 5, 5)
    A[0] = torch.tril(torch.ones(5, 5))
    A[0, 4] = torch.tensor([0.25, 0.25, 0.25, 0.0, 0.25])
    A[0] = A[0] / A[0].sum(-1, keepdim=True)
    pos, q = torch.tensor([[0, 1, 2]]), torch.tensor([4])
    sel = RolloutScorer().select(make_signals([3], [2], layer_attn_full=A.unsqueeze(0), full_pos=pos, full_query=q))
    assert kept(sel, 0) == [0, 1] == ref_rollout_kept(A.numpy(), [0, 1, 2], 4, 3, 2)
    torch.testing.assert_close(sel.scores[0], torch.full((3,), 0.125))
    # batch = each segment alone
    counts, budget = [6, 11, 3], [2, 7, 3]
    x = random_signals(counts, budget, layers=2, seed=5)
    together = RolloutScorer().select(make_signals(**x))
    for s in range(len(counts)):
        y = {k: ([v[s]] if isinstance(v, list) else v) for k, v in x.items()}
        M = int((x["layer_attn_full"][s].sum(dim=(0, 2)) > 0).sum())
        y.update(counts=[counts[s]], budget=[budget[s]], text_counts=[x["text_counts"][s]],
                 layer_attn_full=x["layer_attn_full"][s:s + 1, :, :M, :M], full_pos=x["full_pos"][s:s + 1, :counts[s]],
                 full_query=x["full_query"][s:s + 1])
        alone = RolloutScorer().select(make_signals(**y))
        assert kept(alone, 0) == kept(together, s)


# ----------------------------------------------------------------------------- FlowCut


def ref_flowcut_kept(layer_attn, count, budget, relay=None, momentum=0.5):
    """One segment: layer_attn (L, H, count); relay (count,) or None. Per-layer score: head mean,
    normalised to sum 1 over the candidates (uniform when all zero). Cumulative score: the first
    scored layer's (the relay's, when given), then momentum * cum + (1 - momentum) * score."""
    def norm(v):
        v = [max(float(x), 0.0) for x in v]
        total = sum(v)
        return [x / total for x in v] if total > 0 else [1.0 / len(v)] * len(v)

    per_layer = []
    if relay is not None:
        per_layer.append(norm(relay))
    la = np.asarray(layer_attn, dtype=np.float64)
    for layer in range(la.shape[0]):
        per_layer.append(norm([la[layer, :, v].mean() for v in range(count)]))
    cum = per_layer[0]
    for score in per_layer[1:]:
        cum = [momentum * c + (1.0 - momentum) * x for c, x in zip(cum, score)]
    return top(cum, min(budget, count))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("layers", [1, 2, 4])
@pytest.mark.parametrize("relay", [True, False])
def test_flowcut_matches_released_accumulation_on_ragged_batches(seed, layers, relay):
    counts, budget = [9, 4, 12, 1, 6], [3, 4, 5, 1, 2]
    x = random_signals(counts, budget, layers=layers, seed=seed)
    sig = make_signals(**x)
    if relay:  # segment 3 has no relay capture (NaN row): it runs without the relay
        sig.vision_attn[3] = float("nan")
    sel = FlowCutScorer(relay=relay).select(sig)
    for s, c in enumerate(counts):
        use = relay and s != 3
        want = ref_flowcut_kept(x["layer_attn_last"][s].numpy(), c, budget[s],
                                relay=x["vision_attn"][s].numpy() if use else None)
        assert kept(sel, s) == want, s
    assert sig.diagnostics["relay"].tolist() == [relay and s != 3 for s in range(len(counts))]


@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.9])
def test_flowcut_momentum_option(momentum):
    counts, budget = [10, 7], [4, 3]
    x = random_signals(counts, budget, layers=3, seed=11)
    sel = FlowCutScorer(relay=False, momentum=momentum).select(make_signals(**x))
    for s, c in enumerate(counts):
        assert kept(sel, s) == ref_flowcut_kept(x["layer_attn_last"][s].numpy(), c, budget[s], momentum=momentum)


def test_flowcut_hand_built_order_matters_and_ties():
    # two layers favouring different tokens: the later layer weighs as much as the earlier
    # (0.5 / 0.5), so they tie and the lower slot wins; a third layer breaks the tie its way
    l0 = torch.tensor([0.6, 0.1, 0.3])
    l1 = torch.tensor([0.1, 0.6, 0.3])
    two = torch.stack([l0, l1]).unsqueeze(1)  # (L, H=1, n)
    sig = make_signals([3], [1], layer_attn_last=[two])
    assert kept(FlowCutScorer(relay=False).select(sig), 0) == [0] == ref_flowcut_kept(two.numpy(), 3, 1)
    three = torch.stack([l0, l1, l1]).unsqueeze(1)
    sig = make_signals([3], [1], layer_attn_last=[three])
    assert kept(FlowCutScorer(relay=False).select(sig), 0) == [1] == ref_flowcut_kept(three.numpy(), 3, 1)
