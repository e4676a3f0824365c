"""SparseVLM against a per-sample reference written from the authors' released selection code.

Released code followed: github.com/Gumpest/SparseVLMs @ 26a5f48813c46cd1c7364160354e7fdd3febaa67
(v1.0, the default ``USE_VERSION=1_0``; the rank-adaptive counts from the first release,
@b72c5d6, below): ``llava/model/language_model/modelling_sparse_llama.py``
(``LlamaModel.forward``: raters and recycling), ``score.py`` (``attn_postprocess_topk``,
``sparse_token_dict``) and ``utils.py`` (``cluster_and_merge``). The rule, step by step:

* raters: ``m_v_t = softmax_T(V @ T^T).mean(visual)`` over the visual hidden states V and the
  hidden states T of every token after the image; raters = text rows with ``m_v_t > mean``;
* score of a visual token: the stage layer's attention, averaged over heads, then over the
  raters' rows; keep the top ``sparse_token_dict[RETAIN][stage]`` (capped at count - 1);
* recycling: of the deleted tokens, the top ``int(0.3 d) + 1`` by score are clustered into
  ``int(pool / 10) + 1`` clusters by DPC-kNN (distances / sqrt(C), density from the k = clusters
  nearest, centre score = density * distance to the nearest denser point), every token joining
  its nearest centre, and each cluster averaged into one new token.

vtoken's documented adaptations (``SparseVLMScorer`` docstring), held here as such:
the default raters read RMS-normalised hidden states scaled by 1/sqrt(D) over all text rows
(``raters="released"`` gives the code's raw dot products over the rows after the image), the
budget is kept exactly (the code keeps ``min(budget, count - 1)``), and recycling keeps its
cluster centres inside the budget (k - c plain tokens, centres from the next
int(0.3 (d + c)) + 1 tokens) instead of appending c new tokens. The reference below is float64
numpy over one sample and shares no code with the scorer.
"""

import numpy as np
import pytest
import torch

from vtoken.scorers import SparseVLMScorer
from vtoken.scorers.sparsevlm import SPARSEVLM_TABLES, sparsevlm_budgets
from vtoken.scorers.testing import make_signals

# ``sparse_token_dict`` of score.py (v1.0), copied as data: the released budgets
RELEASED_TABLES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}


# ----------------------------------------------------------------------------- the reference


def softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def ref_raters(vis, text, after, released):
    """Rater rows (indices into ``text``) of one sample."""
    vis = np.asarray(vis, np.float64)
    text = np.asarray(text, np.float64)
    rows = [j for j in range(len(text)) if (after[j] if released else True)]
    t = text[rows]
    if released:
        logits = vis @ t.T
    else:
        rms = lambda x: x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-6)  # noqa: E731
        logits = rms(vis) @ rms(t).T / np.sqrt(vis.shape[1])
    m_v_t = softmax(logits, axis=1).mean(axis=0)  # (T_rows,)
    return [rows[i] for i in np.nonzero(m_v_t > m_v_t.mean())[0]]


def ref_scores(attn_text, raters):
    """attn_text (H, T, n): head mean, then the raters' rows' mean."""
    a = np.asarray(attn_text, np.float64).mean(axis=0)
    return a[raters].mean(axis=0)


def top(scores, k):
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def ref_dpc_knn(x, c):
    """cluster_and_merge's clustering of one sample: centres (list), assignment to the position
    of a centre in ``centres``. The code's 1e-6 random density noise only breaks density ties
    (systematic for k = 2: mutual nearest neighbours); here the lower index counts as denser."""
    x = np.asarray(x, np.float64)
    N, C = x.shape
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)) / C ** 0.5
    nearest = np.sort(dist, axis=1)[:, :c]
    density = np.exp(-(nearest ** 2).mean(axis=1))
    idx = np.arange(N)
    denser = (density[None, :] > density[:, None]) | (  # [i, j]: j denser than i
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    delta = np.where(denser, dist, dist.max()).min(axis=1)
    score = delta * density
    centres = sorted(range(N), key=lambda i: (-score[i], i))[:c]
    assign = [int(np.argmin(dist[i, centres])) for i in range(N)]
    for pos, ctr in enumerate(centres):
        assign[ctr] = pos
    return centres, assign


def ref_recycle(scores, hidden, k):
    """vtoken's exact-budget recycling (module doc): kept indices and {member: centre}."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    d = n - k
    pool_size = int(d * 0.3) + 1
    c = max(1, min(int(pool_size / 10) + 1, k - 1, pool_size))
    plain = order[: k - c]
    rest = order[k - c:]
    pool = rest[: max(c, int(len(rest) * 0.3) + 1)]
    centres, assign = ref_dpc_knn(np.asarray(hidden)[pool], c)
    kept = plain + [pool[i] for i in centres]
    merge = {pool[i]: pool[centres[a]] for i, a in enumerate(assign) if i not in centres}
    return sorted(kept), merge


# ----------------------------------------------------------------------------- inputs


def sample(seed, n, T, after, H=4, D=16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden=torch.randn(n, D, generator=g) * scale, text_hidden=torch.randn(T, D, generator=g) * scale,
                attn_text=torch.softmax(torch.randn(H, T, n, generator=g) * 2, dim=-1),
                text_after=torch.arange(T) >= T - after)


def signals(samples, budgets):
    return make_signals([x["hidden"].shape[0] for x in samples], budgets,
                        text_counts=[x["text_hidden"].shape[0] for x in samples],
                        hidden=[x["hidden"] for x in samples], text_hidden=[x["text_hidden"] for x in samples],
                        attn_text=[x["attn_text"] for x in samples], text_after=[x["text_after"] for x in samples])


def ref_kept(x, k, released):
    r = ref_raters(x["hidden"].numpy(), x["text_hidden"].numpy(), x["text_after"].tolist(), released)
    return top(ref_scores(x["attn_text"].numpy(), r), k)


def kept(sel, s):
    return sel.keep[s].nonzero().flatten().tolist()


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("raters", ["normalized", "released"])
def test_kept_sets_match_reference_on_ragged_batches(seed, raters):
    # ragged: three samples of different visual and text counts in one padded batch; the
    # released rule's raw dot products get hidden states of a realistic scale
    xs = [sample(10 * seed + i, n, T, after, scale=0.3)
          for i, (n, T, after) in enumerate([(60, 12, 8), (37, 7, 7), (81, 15, 5)])]
    budgets = [[20, 9, 33], [1, 36, 80], [59, 2, 17]][seed % 3]
    sel = SparseVLMScorer(raters=raters).select(signals(xs, budgets))
    for s, (x, k) in enumerate(zip(xs, budgets)):
        assert kept(sel, s) == ref_kept(x, k, raters == "released"), (s, k)


def test_the_two_rater_rules_differ():
    """The option is not a no-op: the rules disagree on some input (so each test above pins
    its own rule)."""
    differs = 0
    for seed in range(20):
        x = sample(seed, 40, 10, 4, scale=0.3)
        differs += ref_kept(x, 10, True) != ref_kept(x, 10, False)
    assert differs > 0
    assert "text_after" in SparseVLMScorer(raters="released").needs
    assert "text_after" not in SparseVLMScorer().needs


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,k", [(60, 20), (90, 30), (120, 17), (50, 45)])
def test_recycling_matches_reference(seed, n, k):
    x = sample(seed, n, 9, 6)
    sel = SparseVLMScorer(recycle=True).select(signals([x], [k]))
    r = ref_raters(x["hidden"].numpy(), x["text_hidden"].numpy(), x["text_after"].tolist(), False)
    want_kept, want_merge = ref_recycle(ref_scores(x["attn_text"].numpy(), r), x["hidden"].numpy(), k)
    assert kept(sel, 0) == want_kept
    got_merge = {i: int(t) for i, t in enumerate(sel.merge_into[0].tolist()) if t >= 0}
    assert got_merge == want_merge
    assert int(sel.keep[0].sum()) == k


@pytest.mark.parametrize("seed", range(3))
def test_dpc_knn_on_two_blobs(seed):
    """Two far blobs, two centres: one per blob. With k = 2 the mutual nearest neighbours of a
    blob have equal density; without the released code's tie-break (noise) both became centres."""
    from vtoken.scorers import functional as F
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(6, 4, generator=g) * 0.1, torch.randn(6, 4, generator=g) * 0.1 + 5])
    for centres, assign in (ref_dpc_knn(x.numpy(), 2), [t.tolist() for t in F.dpc_knn(x, 2)]):
        assert sorted(c // 6 for c in centres) == [0, 1]
        assert all(centres[assign[i]] // 6 == i // 6 for i in range(12))


def test_budget_tables_are_the_released_ones():
    assert SPARSEVLM_TABLES == RELEASED_TABLES
    for nominal, table in RELEASED_TABLES.items():
        assert sparsevlm_budgets(nominal) == table


# ----------------------------------------------------------------------------- rank-adaptive counts
# The first release (Gumpest/SparseVLMs up to b72c5d6f, Oct 2024, score.py ``attn_postprocess_rank``):
# count = min(int(rank(R) * scale + bias), n - 1), R = the raters' rows of the head-mean
# attention over the visual columns, rank by torch.linalg.matrix_rank's default tolerance
# (sigma > sigma_max * max(rows, cols) * eps(float32)); nothing pruned when rank == n.


def ref_rank(R):
    R = np.asarray(R, np.float64)
    if R.size == 0:
        return 0
    sv = np.linalg.svd(R, compute_uv=False)
    return int((sv > sv.max() * max(R.shape) * np.finfo(np.float32).eps).sum())


def ref_rank_kept(x, budget, scale, bias=0.0):
    r = ref_raters(x["hidden"].numpy(), x["text_hidden"].numpy(), x["text_after"].tolist(), False)
    a = x["attn_text"].numpy().astype(np.float64).mean(axis=0)
    n = a.shape[1]
    rank = ref_rank(a[r])
    k = n if rank == n else min(int(rank * scale + bias), n - 1)
    k = max(1, min(k, budget))
    return top(ref_scores(x["attn_text"].numpy(), r), k), k


def low_rank_sample(seed, n, T, rank, H=4, D=16):
    """attn_text rows mixing ``rank`` base distributions: the head-mean matrix has rank <= rank."""
    x = sample(seed, n, T, T, H=H, D=D)
    g = torch.Generator().manual_seed(1000 + seed)
    base = torch.softmax(torch.randn(rank, n, generator=g) * 2, dim=-1)
    w = torch.softmax(torch.randn(H, T, rank, generator=g) * 2, dim=-1)
    x["attn_text"] = w @ base
    return x


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale,bias", [(13.5, 0.0), (5.0, 0.0), (2.0, 1.0), (0.8, 0.0)])
def test_rank_adaptive_counts_match_first_release(seed, scale, bias):
    xs = [low_rank_sample(seed, 60, 12, 2), low_rank_sample(seed + 1, 35, 9, 4),
          sample(seed + 2, 40, 8, 8), low_rank_sample(seed + 3, 50, 10, 1)]
    budgets = [60, 35, 40, 20]  # the last one caps the count
    sig = signals(xs, budgets)
    sc = SparseVLMScorer(rank_count=True, rank_scale=scale, rank_bias=bias)
    assert sc.adaptive and not SparseVLMScorer().adaptive
    sel = sc.select(sig)
    for s, (x, b) in enumerate(zip(xs, budgets)):
        want, k = ref_rank_kept(x, b, scale, bias)
        assert int(sig.diagnostics["rank_count"][s]) == k
        assert kept(sel, s) == want, (s, k)


def test_rank_counts_follow_the_rank():
    """Lower rank, fewer tokens: rank 1, 2, 4 at scale 5 keep 5, 10, 20 (ranks checked)."""
    for rank in (1, 2, 4):
        x = low_rank_sample(7, 80, 14, rank)
        r = ref_raters(x["hidden"].numpy(), x["text_hidden"].numpy(), x["text_after"].tolist(), False)
        assert ref_rank(x["attn_text"].numpy().mean(axis=0)[r]) == min(rank, len(r))
        sig = signals([x], [80])
        SparseVLMScorer(rank_count=True, rank_scale=5.0).select(sig)
        assert int(sig.diagnostics["rank_count"][0]) == 5 * min(rank, len(r))


def test_rank_preset():
    from vtoken.methods import build_plan
    plan = build_plan("sparsevlm", 1.0, budget="rank", rank_scale=9.0)
    assert [st.keep for st in plan] == [1.0, 1.0, 1.0] and [st.layer for st in plan] == [2, 6, 15]
    assert plan[0].scorer.rank_count and plan[0].scorer.rank_scale == 9.0 and plan[0].scorer.adaptive
    assert not build_plan("sparsevlm", 64)[0].scorer.adaptive
