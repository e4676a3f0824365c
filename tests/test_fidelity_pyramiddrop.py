"""PyramidDrop against a per-sample reference written from the authors' released selection code.

Released code followed: github.com/Cooperx521/PyramidDrop @ 6444f304aee4b7edcb022839fb9e8cd07859704a,
``llava/model/modeling_llama_pdrop.py`` (``LlamaModel.pdrop_forward`` and ``pdrop_rank_drop``,
inference branch) with the evaluation scripts' settings (``scripts/v1_5/pdrop_eval/*.sh``:
``--layer_list '[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]"``). The rule:

* after layer ``rank_layer - 1`` (rank_layer in 8, 16, 24), the query of the last prompt token
  (``prompt_len + image_tokens - 1``) attends, with RoPE and the causal mask, to the whole
  sequence: softmax over every key, mean over heads, the image columns taken;
* keep the top ``int(N * ratio[stage + 1])`` image tokens (N = the image's original count,
  ratios 1.0, 0.5, 0.25, 0.125), in their original order.

vtoken reads the same row at layer L-1 (``attn_last``) instead of recomputing it with layer
L's projections (documented in ``PyramidDropScorer``); given the same row, the kept sets must
be equal. Budgets: ``pyramiddrop_budgets(keep)`` gives the code's counts for the paper's
576-token setting; fractional budgets round to the nearest token where the code floors
(``vtoken.plan.tokens_for``, vtoken's rule for every method). The reference is float64 numpy.
"""

import numpy as np
import pytest
import torch

from vtoken.methods import build_plan
from vtoken.plan import tokens_for
from vtoken.scorers import PyramidDropScorer
from vtoken.scorers.attention import pyramiddrop_budgets
from vtoken.scorers.testing import make_signals

RATIOS = [1.0, 0.5, 0.25, 0.125]  # image_token_ratio_list with the 1.0 the loader inserts


def reference(row, image_cols, keep_length):
    """row (H, m): softmax attention of the last prompt token over the whole sequence;
    image_cols: the image's columns in that sequence -> kept positions (0..n-1), sorted."""
    avg = np.asarray(row, np.float64).mean(axis=0)[image_cols]
    order = sorted(range(len(image_cols)), key=lambda i: (-avg[i], i))
    return sorted(order[:keep_length])


def full_row(g, H, prefix, n, text):
    """Softmax rows over [prefix, image (n), text] of one sample; returns (row, image columns)."""
    row = torch.softmax(torch.randn(H, prefix + n + text, generator=g) * 2, dim=-1)
    return row, list(range(prefix, prefix + n))


@pytest.mark.parametrize("seed", range(6))
def test_three_stages_match_the_released_rule_on_ragged_batches(seed):
    """Each stage: fresh attention rows over the remaining sequence; budgets int(N * ratio)."""
    g = torch.Generator().manual_seed(seed)
    originals = [576, 200, 97]
    remaining = [list(range(n)) for n in originals]  # original indices still present
    for stage in range(3):
        rows, cols = [], []
        for s, rem in enumerate(remaining):
            row, c = full_row(g, 4, 5 + s, len(rem), 9 + 3 * s)
            rows.append(row)
            cols.append(c)
        budgets = [int(n * RATIOS[stage + 1]) for n in originals]
        sig = make_signals([len(r) for r in remaining], budgets, index=remaining, original=originals,
                           attn_last=[row[:, c] for row, c in zip(rows, cols)])
        sel = PyramidDropScorer().select(sig)
        for s in range(len(originals)):
            want = reference(rows[s].numpy(), cols[s], budgets[s])
            assert sel.keep[s].nonzero().flatten().tolist() == want, (stage, s)
            remaining[s] = [remaining[s][i] for i in want]
    assert [len(r) for r in remaining] == [72, 25, 12]


def test_preset_budgets_are_the_released_ones_at_576_tokens():
    for keep in (72, 64, 0.125):
        plan = build_plan("pyramiddrop", keep)
        assert [st.layer for st in plan] == [8, 16, 24]
        got = [tokens_for(st.keep, 576) for st in plan]
        if keep == 64:
            assert got == [256, 128, 64]  # keep / lam^i, the paper's halving
        else:
            assert got == [int(576 * r) for r in RATIOS[1:]]  # 288, 144, 72
    assert pyramiddrop_budgets(72) == (288, 144, 72)


def test_fraction_rounding_is_the_documented_deviation():
    """The code floors int(N * ratio); vtoken rounds to nearest. They differ only on .5 and up."""
    for n in (576, 1024, 256):
        assert [tokens_for(f, n) for f in RATIOS[1:]] == [int(n * r) for r in RATIOS[1:]]
    assert tokens_for(0.125, 391) == 49 and int(391 * 0.125) == 48
