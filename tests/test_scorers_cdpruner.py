"""CDPruner (Zhang et al., NeurIPS 2025): kept sets equal a plain-loop reference written from the
authors' released ``encode_images`` (github.com/Theia-4869/CDPruner, llava/model/llava_arch.py at
9541616c): relevance, kernel, fast greedy MAP of the DPP, per segment, on given signals; and the
fast rule equals its definition (greedy log-determinant)."""

import numpy as np
import pytest
import torch

from vtoken.scorers import CDPrunerScorer
from vtoken.scorers.testing import make_signals, random_signals

COUNTS = [23, 9, 1, 16, 40]
TEXT = [4, 2, 3, 5, 1]


def reference_kernel(x, text, negate=True):
    """Released kernel, one segment, float64: L = r_i cos(x_i, x_j) r_j with r = mean over the
    instruction rows of -cos(x_i, t), min-max normalised ((r - min + 1e-6) / (max - min))."""
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    r = (z @ t.T).mean(axis=1)
    r = -r if negate else r
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    return r[:, None] * (z @ z.T) * r[None, :]


def reference_fast_map(L, k):
    """Released fast greedy MAP (plain loops): argmax of d^2 (first maximum), e = (L[j] -
    sum_t c_t[j] c_t) / sqrt(d_j^2), d^2 -= e^2, d_j^2 = -inf."""
    d2 = np.diag(L).copy()
    cis, picks = [], []
    for _ in range(min(k, len(L))):
        j = int(np.argmax(d2))
        picks.append(j)
        e = L[j].copy()
        for c in cis:
            e -= c[j] * c
        e /= np.sqrt(d2[j])
        cis.append(e)
        d2 -= e ** 2
        d2[j] = -np.inf
    return picks


def greedy_logdet(L, k):
    """The definition the fast rule implements: add the token maximising log det(L_K)."""
    picks = []
    for _ in range(k):
        best, arg = -np.inf, None
        for j in range(len(L)):
            if j in picks:
                continue
            sub = L[np.ix_(picks + [j], picks + [j])]
            val = np.linalg.slogdet(sub)[1]
            if val > best:
                best, arg = val, j
        picks.append(arg)
    return picks


def instruction(kw, s):
    rows = kw["text_after"][s]
    return kw["text_hidden"][s][rows].double().numpy()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("budgets", [[7, 9, 1, 5, 12], [1, 2, 1, 15, 20], [12, 4, 1, 8, 3]])
def test_cdpruner_equals_released_rule(seed, budgets):
    kw = random_signals(COUNTS, budgets, text_counts=TEXT, seed=seed, dim=32)
    sig = make_signals(**kw)
    sel = CDPrunerScorer().select(sig)
    assert sel.keep.sum(1).tolist() == [min(b, c) for b, c in zip(budgets, COUNTS)]
    assert not (sel.keep & ~sig.mask).any()
    for s, c in enumerate(COUNTS):
        if c == 1:
            assert sel.keep[s, 0]
            continue
        L = reference_kernel(kw["hidden"][s].double().numpy(), instruction(kw, s))
        picks = reference_fast_map(L, budgets[s])
        assert sel.keep[s].nonzero().flatten().tolist() == sorted(picks)
        order = torch.argsort(sel.scores[s, :c], descending=True, stable=True)[: len(picks)].tolist()
        assert order == picks


def test_fast_map_is_greedy_logdet_and_negate_option():
    budgets = [6, 5, 1, 7, 9]
    kw = random_signals(COUNTS, budgets, text_counts=TEXT, seed=9, dim=32)
    for negate in (True, False):
        sel = CDPrunerScorer(negate=negate).select(make_signals(**kw))
        for s in (0, 3, 4):
            L = reference_kernel(kw["hidden"][s].double().numpy(), instruction(kw, s), negate)
            picks = reference_fast_map(L, budgets[s])
            assert picks == greedy_logdet(L, budgets[s])
            assert sel.keep[s].nonzero().flatten().tolist() == sorted(picks)


def test_cdpruner_without_instruction_is_plain_dpp_and_rank_guard():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(12, 16, generator=g)
    sig = make_signals([12], [5], text_counts=[2], hidden=[h], text_hidden=[torch.randn(2, 16, generator=g)],
                       text_after=[torch.zeros(2, dtype=torch.bool)])
    sel = CDPrunerScorer().select(sig)
    # the kernel is the plain cosine similarity; its diagonal is 1 up to rounding, so the reference
    # runs on the same float32 similarity (the first pick is a tie broken by that rounding)
    z = h / h.norm(dim=1, keepdim=True)
    assert sel.keep[0].nonzero().flatten().tolist() == sorted(reference_fast_map((z @ z.T).double().numpy(), 5))
    # rank-deficient kernel (features of rank 2, budget 6): still exactly 6 distinct real tokens
    low = torch.randn(10, 2, generator=g) @ torch.randn(2, 8, generator=g)
    sig = make_signals([10, 3], [6, 2], text_counts=[1, 1], hidden=[low, torch.randn(3, 8, generator=g)],
                       text_hidden=[torch.randn(1, 8, generator=g)] * 2,
                       text_after=[torch.ones(1, dtype=torch.bool)] * 2)
    sel = CDPrunerScorer().select(sig)
    assert sel.keep.sum(1).tolist() == [6, 2] and not (sel.keep & ~sig.mask).any()
    assert torch.isfinite(sel.scores[sig.mask]).all()


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "qwen3_vl"])
def test_cdpruner_end_to_end_equals_reference_on_the_models_embeddings(name):
    """Through ``apply_pruning``: the kept tokens are the released rule's on what enters the
    language model (projected visual features; the prompt after the image as instruction)."""
    import vtoken
    from conftest import get_inputs, get_model

    model = get_model(name)
    inputs = get_inputs(name, model, variant="single")
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: captured.update(kw),
                                                                  with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    ids = inputs["input_ids"][0]
    image_id = getattr(model.config, "image_token_id", None)
    image_id = model.config.image_token_index if image_id is None else image_id
    vis = (ids == image_id).nonzero().flatten()
    real = inputs["attention_mask"][0].bool()
    after = real & (torch.arange(ids.numel()) > vis.max())
    emb = captured["inputs_embeds"][0].double()
    k = 6
    L = reference_kernel(emb[vis].numpy(), emb[after].numpy())
    picks = reference_fast_map(L, k)
    with vtoken.apply_pruning(model, method="cdpruner", keep=k) as h, torch.no_grad():
        model(**inputs)
        kept = h.stats.stages[0].kept[0].tolist()
    assert kept == sorted(picks)
