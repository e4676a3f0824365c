"""VisPruner (Zhang et al., ICCV 2025): kept sets equal a plain-loop reference written from the
authors' released ``encode_images`` (github.com/Theia-4869/VisPruner, llava/model/llava_arch.py at
aefa01ad), per segment, on given signals: ragged segments (odd residual lengths included),
several seeds, budgets and ratios."""

import numpy as np
import pytest
import torch

from vtoken.scorers import VisPrunerScorer
from vtoken.scorers.testing import make_signals, random_signals

COUNTS = [23, 9, 1, 16, 40, 57]


def reference_vispruner(x, attn, T, ratio=0.5, step=8):
    """The released rule, one segment: important = top int(T * ratio) by attention; the rest in
    decreasing attention; rounds of r = min(step, R - diverse): first-half (even positions)
    tokens ranked by their best cosine match in the second half (odd positions), the r best
    matched removed, the rest (in that ranking) followed by the second half. Sorts are stable."""
    n = len(x)
    T = min(T, n)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    n_imp = int(T * ratio)
    diverse = T - n_imp
    ranked = sorted(range(n), key=lambda i: -attn[i])
    important, residual = ranked[:n_imp], ranked[n_imp:]
    while diverse > 0:
        r = min(step, len(residual) - diverse)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        best = [max(float(z[i] @ z[j]) for j in b) for i in a]
        by_match = sorted(range(len(a)), key=lambda p: -best[p])
        residual = [a[p] for p in by_match[r:]] + b  # r > len(a) (the released indexing fails): a emptied
    return important + (residual if diverse > 0 else [])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budgets", [[7, 9, 1, 5, 12, 10], [1, 2, 1, 15, 39, 3], [20, 4, 1, 8, 3, 31]])
@pytest.mark.parametrize("ratio,step", [(0.5, 8), (0.25, 8), (0.75, 3), (0.0, 8), (1.0, 8)])
def test_vispruner_equals_released_rule(seed, budgets, ratio, step):
    kw = random_signals(COUNTS, budgets, seed=seed, dim=24)
    sig = make_signals(**kw)
    sel = VisPrunerScorer(important_ratio=ratio, step=step).select(sig)
    assert sel.keep.sum(1).tolist() == [min(b, c) for b, c in zip(budgets, COUNTS)]
    assert not (sel.keep & ~sig.mask).any()
    for s in range(len(COUNTS)):
        ref = reference_vispruner(kw["hidden"][s].double().numpy(), kw["vision_attn"][s].tolist(), budgets[s], ratio,
                                  step)
        assert sel.keep[s].nonzero().flatten().tolist() == sorted(ref)
    assert sig.diagnostics["erank"].shape == (len(COUNTS),)


def test_vispruner_drops_duplicates_among_the_rest():
    # token 0 most attended (important); the rest: pairs of near-duplicates and distinct ones
    d = torch.eye(4)
    h = torch.stack([d[0], d[1], d[1] + 0.01, d[2], d[2] + 0.01, d[3], -d[0]])
    attn = torch.tensor([0.9, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    sel = VisPrunerScorer(step=1).select(make_signals([7], [4], hidden=[h], vision_attn=[attn]))
    kept = sel.keep[0].nonzero().flatten().tolist()
    assert 0 in kept and 1 in kept  # the two important ones (int(4 * 0.5) = 2)
    assert len({3, 4} & set(kept)) <= 1  # a near-duplicate pair is never kept twice


def test_vispruner_rejects_bad_options():
    with pytest.raises(ValueError):
        VisPrunerScorer(important_ratio=1.5)
    with pytest.raises(ValueError):
        VisPrunerScorer(step=0)


def test_vispruner_end_to_end_equals_reference_on_the_models_signals():
    import vtoken
    from conftest import get_inputs, get_model
    from test_scorers_scope import llava_signals

    model = get_model("llava", attn="eager")  # eager: the encoder returns its attention maps here
    inputs = get_inputs("llava", model, variant="single")
    feats, cls = llava_signals(model, inputs)
    for k in (3, 7, 12):
        with vtoken.apply_pruning(model, method="vispruner", keep=k) as h, torch.no_grad():
            model(**inputs)
            kept = h.stats.stages[0].kept[0].tolist()
        assert kept == sorted(reference_vispruner(feats, cls.tolist(), k))
