"""VisionZip against a per-sample plain-loop reference written from the authors' released code
(dvlab-research/VisionZip@3151f6d, ``visionzip/clip_encoder.py``, the branch that selects
dominant and contextual tokens):

* dominant: the [CLS] row of the penultimate layer's attention over the patches, summed over
  heads, top ``dominant_num``;
* contextual: the remaining tokens in order; ``step = max(1, remaining // contextual_num)``; the
  targets are every ``step``-th remaining token, the first ``contextual_num`` of them; every other
  remaining token is assigned to the target whose L2-normalised key is most similar
  (``argmax``: the first, i.e. lowest, target on ties).

vtoken: no [CLS] token is kept (it is not an LLM token); ``vision_attn`` arrives averaged over
heads (the same ranking as the sum); the dominant / contextual split is ``split(budget)``
(54 + 10 at 64). The merged *value* of a contextual token differs (vtoken: weighted mean of the
target and its members; released: target + mean of members) -- a documented deviation of the
runtime's merge, not of the kept set or the assignment held here. Ties: lower index.
"""

import numpy as np
import pytest
import torch

from vtoken.scorers import VisionZipScorer
from vtoken.scorers.testing import make_signals


def ref_visionzip(heads, keys, dominant_num, contextual_num):
    """heads (H, n) [CLS] rows, keys (n, Dk) -> (kept sorted list, {merged token: target})."""
    heads = np.asarray(heads, dtype=np.float64)
    n = heads.shape[1]
    summed = [heads[:, v].sum() for v in range(n)]
    dominant = sorted(sorted(range(n), key=lambda v: (-summed[v], v))[:dominant_num])
    rest = [v for v in range(n) if v not in dominant]
    merge = {}
    if contextual_num == 0 or not rest:
        return dominant, merge
    step = max(1, len(rest) // contextual_num)
    targets = rest[0::step][:contextual_num]
    k = np.asarray(keys, dtype=np.float64)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    for v in rest:
        if v in targets:
            continue
        sims = [float(k[v] @ k[t]) for t in targets]
        merge[v] = targets[int(np.argmax(sims))]
    return sorted(dominant + targets), merge


@pytest.mark.parametrize("seed", range(4))
def test_visionzip_matches_released_rule_on_ragged_batches(seed):
    g = torch.Generator().manual_seed(seed)
    counts, budgets = [100, 30, 17, 9, 64], [64, 10, 1, 9, 20]
    heads = [torch.softmax(torch.randn(4, c, generator=g) * 2, dim=-1) for c in counts]
    keys = [torch.randn(c, 6, generator=g) for c in counts]
    sig = make_signals(counts, budgets, vision_attn=[h.mean(0) for h in heads], vision_keys=keys)
    z = VisionZipScorer()
    sel = z.select(sig)
    for s, c in enumerate(counts):
        d, ctx = z.split(min(budgets[s], c))
        want_kept, want_merge = ref_visionzip(heads[s], keys[s], d, ctx)
        assert sel.keep[s].nonzero().flatten().tolist() == want_kept, s
        got_merge = {j: int(sel.merge_into[s, j]) for j in range(c) if int(sel.merge_into[s, j]) >= 0}
        assert got_merge == want_merge, s
    assert z.split(64) == (54, 10)


def test_visionzip_assignment_ties_go_to_the_lowest_target():
    # 8 tokens, budget 4 split 2 dominant + 2 contextual (ratio 0.5): rest = 6 tokens, step 3,
    # targets = rest[0], rest[3]; identical keys everywhere: every merged token ties between the
    # two targets and goes to the lower one
    att = torch.tensor([0.3, 0.25, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05])
    keys = torch.ones(8, 3)
    sig = make_signals([8], [4], vision_attn=[att], vision_keys=[keys])
    sel = VisionZipScorer(contextual_ratio=0.5).select(sig)
    kept, merge = ref_visionzip(att.unsqueeze(0), keys, 2, 2)
    assert kept == [0, 1, 2, 5] == sel.keep[0].nonzero().flatten().tolist()
    assert merge == {3: 2, 4: 2, 6: 2, 7: 2}
    assert [int(m) for m in sel.merge_into[0]] == [-1, -1, -1, 2, 2, -1, 2, 2]
