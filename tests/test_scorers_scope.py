"""SCOPE (Deng et al., NeurIPS 2025): kept sets equal a plain-loop reference written from the
authors' released ``SCOPE`` function (github.com/kinredon/SCOPE, scope/clip_encoder.py at
6bf73069), per segment, on given signals: ragged segments, several seeds and budgets."""

import numpy as np
import pytest
import torch

from vtoken.scorers import SCOPEScorer
from vtoken.scorers.testing import make_signals, random_signals

COUNTS = [23, 9, 1, 16, 40]


def reference_scope(x, sal, k, alpha=1.0, combine="multi"):
    """The released greedy rule, one segment, float64: coverage starts at 0; each step every
    unchosen j gets sum_i max(0, cos(i, j) - cover_i), times (or plus) sal_j ** alpha; the first
    maximum wins (argmax); cover <- max(cover, cos(., j))."""
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = z @ z.T
    n = len(x)
    cover = np.zeros(n)
    picks = []
    for _ in range(min(k, n)):
        best, arg = None, None
        for j in range(n):
            if j in picks:
                continue
            gain = sum(max(0.0, cos[i, j] - cover[i]) for i in range(n))
            score = gain * sal[j] ** alpha if combine == "multi" else gain + sal[j] ** alpha
            if best is None or score > best:
                best, arg = score, j
        picks.append(arg)
        cover = np.maximum(cover, cos[arg])
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("budgets", [[7, 9, 1, 5, 12], [1, 2, 1, 15, 39], [20, 4, 1, 8, 3]])
def test_scope_equals_released_rule(seed, budgets):
    kw = random_signals(COUNTS, budgets, seed=seed, dim=24)
    sig = make_signals(**kw)
    sel = SCOPEScorer().select(sig)
    assert sel.keep.sum(1).tolist() == [min(b, c) for b, c in zip(budgets, COUNTS)]
    assert not (sel.keep & ~sig.mask).any()
    for s, c in enumerate(COUNTS):
        picks = reference_scope(kw["hidden"][s].double().numpy(), kw["vision_attn"][s].double().numpy(), budgets[s])
        assert sel.keep[s].nonzero().flatten().tolist() == sorted(picks)
        # the heatmap scores rank the picks in the reference's order
        order = torch.argsort(sel.scores[s, :c], descending=True, stable=True)[: len(picks)].tolist()
        assert order == picks
    assert sig.diagnostics["erank"].shape == (len(COUNTS),)


@pytest.mark.parametrize("alpha,combine", [(0.5, "multi"), (2.0, "multi"), (1.0, "add")])
def test_scope_options_equal_released_branches(alpha, combine):
    budgets = [6, 3, 1, 10, 17]
    kw = random_signals(COUNTS, budgets, seed=5, dim=24)
    sel = SCOPEScorer(alpha=alpha, combine=combine).select(make_signals(**kw))
    for s in range(len(COUNTS)):
        picks = reference_scope(kw["hidden"][s].double().numpy(), kw["vision_attn"][s].double().numpy(), budgets[s],
                                alpha, combine)
        assert sel.keep[s].nonzero().flatten().tolist() == sorted(picks)


def test_scope_covers_before_repeating_and_ties_to_lower_index():
    # tokens 0-3 are one direction (0 most salient), 4 and 5 two others: with equal saliency
    # elsewhere, the second pick is not a duplicate of the first
    d = torch.eye(3)
    h = torch.stack([d[0], d[0] * 2, d[0] * 3, d[0] + 0.01, d[1], d[2]])
    sal = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    sel = SCOPEScorer().select(make_signals([6], [3], hidden=[h], vision_attn=[sal]))
    assert sel.keep[0].nonzero().flatten().tolist() == [0, 4, 5]
    # all equal: the first token wins each step among equals (argmax)
    sel = SCOPEScorer().select(make_signals([4], [1], hidden=[torch.ones(4, 3)], vision_attn=[torch.ones(4)]))
    assert sel.keep[0].tolist() == [True, False, False, False]


def test_scope_rejects_bad_options():
    with pytest.raises(ValueError):
        SCOPEScorer(combine="max")
    with pytest.raises(ValueError):
        SCOPEScorer(alpha=-1.0)


def llava_signals(model, inputs):
    """What SCOPE / VisPruner read on tiny LLaVA, computed here from the model itself: the
    projected visual embeddings entering the language model (N, D) and the encoder's [CLS]
    attention to each patch at the layer whose output the projector takes (heads averaged)."""
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: captured.update(kw),
                                                                  with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        enc = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    hook.remove()
    ids = inputs["input_ids"][0]
    vis = (ids == model.config.image_token_index).nonzero().flatten()
    layers = len(enc.attentions)
    layer = layers + 1 + model.config.vision_feature_layer - 1  # hidden_states[i] leaves layer i - 1
    attn = enc.attentions[layer][0, :, 0, 1:].mean(dim=0)
    return captured["inputs_embeds"][0, vis].double().numpy(), attn.double().numpy()


def test_scope_end_to_end_equals_reference_on_the_models_signals():
    import vtoken
    from conftest import get_inputs, get_model

    model = get_model("llava", attn="eager")  # eager: the encoder returns its attention maps here
    inputs = get_inputs("llava", model, variant="single")
    feats, cls = llava_signals(model, inputs)
    for k in (3, 7):
        with vtoken.apply_pruning(model, method="scope", keep=k) as h, torch.no_grad():
            model(**inputs)
            kept = h.stats.stages[0].kept[0].tolist()
        assert kept == sorted(reference_scope(feats, cls, k))
