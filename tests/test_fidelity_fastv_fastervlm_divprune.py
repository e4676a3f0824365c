"""FastV, FasterVLM and DivPrune against per-sample plain-loop references written from the
authors' released selection code, on the same signals.

* FastV (pkunlp-icler/FastV@d165972, ``src/FastV/llava-hf/transformers/src/transformers/models/
  llama/modeling_llama.py``, the ``layer_idx == FASTV_k`` branch): the attention of layer K-1,
  averaged over heads, the last token's row, the image columns; keep the top
  round(N * (1 - R)) image tokens. vtoken's ``attn_last`` is that row (image columns of the
  softmax over the whole sequence); the budget is given.
* FasterVLM (Theia-4869/FasterVLM@f5d5f12, ``llava/model/llava_arch.py`` ``encode_images`` and
  ``multimodal_encoder/clip_encoder.py``): the [CLS] row of the vision tower's select layer
  over the patches, averaged over heads, top ``visual_token_num``. The head mean is the
  adapter's (``vision_attn`` arrives averaged); the scorer ranks it.
* DivPrune (vbdi/divprune@799e2d9, ``LLaVA/llava/model/llava_arch.py`` ``DivPrune``): distance
  1 - cosine similarity; the first pick maximises the second smallest entry of each column
  (the nearest other token), every later pick the minimum distance to the picks so far;
  ``torch.argmax`` takes the first maximum (ties: the lower index).

The released ``topk`` calls leave the order of equal scores unspecified; vtoken (and these
references) break such ties towards the lower index.
"""

import numpy as np
import pytest
import torch

from vtoken.scorers import DivPruneScorer, FasterVLMScorer, FastVScorer
from vtoken.scorers.testing import make_signals, random_signals


def kept(sel, s):
    return sel.keep[s].nonzero().flatten().tolist()


def top(scores, k):
    order = sorted(range(len(scores)), key=lambda v: (-scores[v], v))
    return sorted(order[:k])


def ref_fastv(attn, budget):
    """attn (H, n) image columns of the last token's row at layer K-1."""
    a = np.asarray(attn, dtype=np.float64)
    return top([a[:, v].mean() for v in range(a.shape[1])], min(budget, a.shape[1]))


def ref_divprune(x, budget):
    """The released greedy loop on x (n, D), float64."""
    x = np.asarray(x, dtype=np.float64)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1.0 - z @ z.T
    n = len(x)
    picks = []
    for i in range(min(budget, n)):
        if i == 0:
            scores = np.sort(dist, axis=0)[1] if n > 1 else np.zeros(1)  # second smallest per column
        else:
            scores = dist[picks].min(axis=0)
        picks.append(int(np.argmax(scores)))  # first maximum
    return sorted(picks)


@pytest.mark.parametrize("seed", range(5))
def test_fastv_matches_released_rule_on_ragged_batches(seed):
    counts, budget = [20, 7, 33, 1, 12], [5, 7, 9, 1, 0]
    x = random_signals(counts, budget, heads=8, seed=seed)
    sel = FastVScorer().select(make_signals(**x))
    for s, c in enumerate(counts):
        assert kept(sel, s) == ref_fastv(x["attn_last"][s], budget[s]), s


def test_fastv_ties_to_lower_index():
    a = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.1, 0.3, 0.3, 0.3]])
    sel = FastVScorer().select(make_signals([4], [2], attn_last=[a]))
    assert kept(sel, 0) == [1, 2] == ref_fastv(a, 2)


@pytest.mark.parametrize("seed", range(5))
def test_fastervlm_matches_released_rule_on_ragged_batches(seed):
    counts, budget = [24, 9, 16, 2], [6, 9, 3, 1]
    x = random_signals(counts, budget, seed=seed)
    g = torch.Generator().manual_seed(seed)
    # per-head [CLS] rows, averaged as the released encode_images does before its topk
    heads = [torch.softmax(torch.randn(4, c, generator=g) * 2, dim=-1) for c in counts]
    x["vision_attn"] = [h.mean(dim=0) for h in heads]
    sel = FasterVLMScorer().select(make_signals(**x))
    for s, c in enumerate(counts):
        assert kept(sel, s) == ref_fastv(heads[s], budget[s]), s


@pytest.mark.parametrize("seed", range(5))
def test_divprune_matches_released_rule_on_ragged_batches(seed):
    counts, budget = [30, 6, 17, 1, 11], [8, 6, 5, 1, 2]
    x = random_signals(counts, budget, dim=12, seed=seed)
    sel = DivPruneScorer().select(make_signals(**x))
    for s, c in enumerate(counts):
        assert kept(sel, s) == ref_divprune(x["hidden"][s], budget[s]), s


def test_divprune_hand_built_duplicates_and_ties():
    # 0/1 duplicates, 2 and 3 orthogonal to everything: the first pick is 2 (nearest other token
    # at distance 1, tied with 3, lower index), then 0 (distance 1, tied with 1 and 3), then 3
    z = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    sel = DivPruneScorer().select(make_signals([4], [3], hidden=[z]))
    assert kept(sel, 0) == [0, 2, 3] == ref_divprune(z, 3)
