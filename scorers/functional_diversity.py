"""Feature geometry and diversity, for the scorers (pure tensor functions, re-exported by
:mod:`vtoken.scorers.functional`): cosine similarity, nearest neighbours, greedy max-min
selection, effective rank, and density-peaks clustering.

Conventions of :mod:`vtoken.scorers.functional` (padded per-segment tensors, ``mask`` (S, n)).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from vtoken.signals import Deferred

#: chunk of rows used when an (n x n) similarity would not fit comfortably in memory
ROW_CHUNK = 1024
#: most similarities (segments x n x n, float32) greedy_maxmin holds at once: 64 M = 256 MB
GRAM_ENTRIES = 1 << 26


# ----------------------------------------------------------------------------- similarity


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the last axis (float32)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def _nearest_from_similarity(sim: torch.Tensor, mask: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of the nearest-other-real-slot distance from their similarities ``sim``
    (S, c, n) to every slot (see :func:`nearest_neighbour_distance`)."""
    ar = torch.arange(rows.start, rows.stop, device=sim.device)
    d = (1.0 - sim).masked_fill(~mask.unsqueeze(1), float("inf"))
    d[:, ar - rows.start, ar] = float("inf")  # not its own neighbour
    return d.min(dim=2).values


def nearest_neighbour_distance(z: torch.Tensor, mask: torch.Tensor,
                               gram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """For unit features z (S, n, D): each real slot's cosine distance (1 - cos) to its nearest
    OTHER real slot; (S, n), +inf where a segment has a single candidate, +inf on padding.

    From ``gram`` (S, n, n) = z z^T when given, else computed in row chunks so the (n x n) matrix
    is never held at once for large n.
    """
    S, n, _ = z.shape
    out = torch.full((S, n), float("inf"), dtype=torch.float32, device=z.device)
    for start in range(0, n, ROW_CHUNK):
        rows = slice(start, min(n, start + ROW_CHUNK))
        sim = gram[:, rows] if gram is not None else z[:, rows] @ z.transpose(1, 2)  # (S, c, n)
        out[:, rows] = _nearest_from_similarity(sim, mask, rows)
    return out.masked_fill(~mask, float("inf"))


def greedy_maxmin(
    features: torch.Tensor,
    mask: torch.Tensor,
    budget: torch.Tensor,
    seed: Optional[torch.Tensor] = None,
) -> tuple:
    """Greedy max-min diversity selection (DivPrune's solver of the Max-Min Diversity Problem).

    features (S, n, D), mask (S, n) bool, budget (S,) long, seed (S, n) bool or None: slots
    already chosen (they count against the budget). Distance = 1 - cosine similarity.

    The first pick (when ``seed`` is empty) is the token whose nearest neighbour is farthest
    away; every later pick is the unchosen real token whose minimum distance to the chosen set
    is largest. Ties break towards the lower slot index.

    Returns (keep (S, n) bool with exactly ``max(budget, seeds)`` True per row, order (S, n)
    long: pick rank of each chosen slot, -1 elsewhere; seeds rank 0..).
    """
    from vtoken.kernels.greedy_select import greedy_maxmin_gram, greedy_maxmin_picks

    S, n = mask.shape
    dev = mask.device
    z = unit_rows(features)
    # the cosine similarities of every pair at once (as the released code's distance matrix) where
    # they fit: then every pick runs in one launch (vtoken.kernels.greedy_select)
    gram = z @ z.transpose(1, 2) if S * n * n <= GRAM_ENTRIES else None
    keep = torch.zeros((S, n), dtype=torch.bool, device=dev)
    order = torch.full((S, n), -1, dtype=torch.long, device=dev)
    budget = torch.minimum(budget.to(dev).long(), mask.sum(dim=1))
    mind = torch.full((S, n), float("inf"), dtype=torch.float32, device=dev)
    picked = torch.zeros(S, dtype=torch.long, device=dev)
    if seed is not None:
        seed = seed & mask
        keep |= seed
        # seeds rank in slot order
        order = torch.where(seed, seed.long().cumsum(dim=1) - 1, order)
        picked = seed.sum(dim=1)
        # min distance of every slot to its segment's seed set (inf without seeds)
        nearest_seed = (gram.masked_fill(~seed.unsqueeze(1), float("-inf")).amax(dim=2) if gram is not None
                        else masked_max_similarity(z, seed)[0])
        mind = 1.0 - nearest_seed
    first_score = None
    if seed is None or bool((picked == 0).any()):  # without seeds every segment needs it: no host sync
        first_score = nearest_neighbour_distance(z, mask, gram)
    steps = (budget - picked).clamp(min=0)
    if gram is not None:
        return greedy_maxmin_gram(gram, mask, steps, mind, first_score, keep, order, picked)

    def similarity_of(pick):  # (S, 1) -> (S, n): the picked features against every slot
        zp = z.gather(1, pick.unsqueeze(-1).expand(-1, 1, z.shape[-1]))  # (S, 1, D)
        return (z @ zp.transpose(1, 2)).squeeze(-1)

    return greedy_maxmin_picks(similarity_of, mask, steps, mind, first_score, keep, order, picked)


def masked_max_similarity(z: torch.Tensor, cols: torch.Tensor, cap: int = 1 << 24) -> tuple:
    """Largest similarity of every row to the chosen columns of its segment.

    z (S, n, D) rows (unit rows: cosine similarity), cols (S, n) bool -> (values (S, n): max over
    j with cols[s, j] of z[s, i] . z[s, j], -inf where a segment has no chosen column; index
    (S, n) long: that j, the lowest on ties). Computed in blocks of at most ``cap`` similarities
    (segments x query rows), a loop over shapes only: no host sync, bounded memory for long
    segments.
    """
    S, n = cols.shape
    values = torch.full((S, n), float("-inf"), dtype=z.dtype, device=z.device)
    index = torch.zeros((S, n), dtype=torch.long, device=z.device)
    rows = min(max(n, 1), max(1, cap // max(n, 1)))  # query rows per block
    segs = max(1, cap // max(rows * n, 1))  # segments per block
    for s0 in range(0, S, segs):
        zs, cs = z[s0: s0 + segs], cols[s0: s0 + segs].unsqueeze(1)
        for r0 in range(0, n, rows):
            sim = (zs[:, r0: r0 + rows] @ zs.transpose(1, 2)).masked_fill(~cs, float("-inf"))  # (c, r, n)
            best = sim.max(dim=2)
            values[s0: s0 + segs, r0: r0 + rows] = best.values
            index[s0: s0 + segs, r0: r0 + rows] = best.indices
    return values, index


def cosine_to(features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of features (n, D) to query (D,) -> (n,)."""
    return unit_rows(features) @ unit_rows(query)


# ----------------------------------------------------------------------------- effective rank


def erank(features: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, EUSIPCO 2007) of a feature matrix.

    features (n, d) -> 0-dim float32 tensor: exp(H(p)) with p_i = sigma_i / sum(sigma) the
    normalised singular values and H the Shannon entropy (natural log). It lies in
    [1, min(n, d)] for a non-zero matrix (1 = rank one, min(n, d) = all singular values equal);
    an empty or all-zero matrix has effective rank 0. Features are not centred.
    """
    x = features.detach().double()
    if x.dim() != 2:
        raise ValueError(f"erank expects a 2-D (tokens, features) matrix; got shape {tuple(features.shape)}")
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    # singular values from the eigenvalues of the smaller Gram matrix (cheaper than an SVD of a
    # wide token matrix; float64 keeps the small ones accurate enough for the entropy)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    sv = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
    total = sv.sum()
    if not bool(total > 0):
        return torch.zeros((), dtype=torch.float32, device=x.device)
    p = sv / total
    h = -(p * torch.log(p.clamp(min=1e-300))).sum()
    return torch.exp(h).float()


def erank_per_segment(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """:func:`erank` of each segment's kept rows: hidden (S, n, D), keep (S, n) bool -> (S,) float32.

    All segments at once, with one host sync (the largest kept count k): each segment's kept rows
    are packed (in slot order) into a zero-padded (S, k, D) batch, whose padding rows add only
    zero singular values (which add nothing to the entropy), and one batched ``eigvalsh`` of the
    smaller Gram matrices gives the singular values.
    """
    S, n, D = hidden.shape
    k = int(keep.sum(dim=1).max()) if S and n else 0
    if k == 0:
        return torch.zeros(S, dtype=torch.float32, device=hidden.device)
    pos = torch.cumsum(keep.long(), dim=1) - 1  # (S, n) packed position of each kept row
    packed = hidden.new_zeros((S, k + 1, D), dtype=torch.float64)
    dest = torch.where(keep, pos, torch.full_like(pos, k))  # dropped rows go to a scratch row
    packed.scatter_(1, dest.unsqueeze(-1).expand(S, n, D), hidden.detach().double())
    x = packed[:, :k]
    gram = x @ x.transpose(1, 2) if k <= D else x.transpose(1, 2) @ x
    sv = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()  # (S, min(k, D))
    total = sv.sum(dim=1, keepdim=True)
    p = sv / total.clamp(min=torch.finfo(torch.float64).tiny)
    h = -(p * torch.log(p.clamp(min=1e-300))).sum(dim=1)
    return torch.where(total.squeeze(1) > 0, torch.exp(h), torch.zeros_like(h)).float()


def deferred_erank(hidden: torch.Tensor, keep: torch.Tensor) -> Deferred:
    """:func:`erank_per_segment` of ``hidden`` (S, n, D) and ``keep`` (S, n), computed when the
    diagnostic is read (:class:`vtoken.signals.Deferred`), not in the prefill (no decomposition, no
    host sync there). The diagnostic holds both tensors until it is read or the stats are replaced
    by the next pruned prefill (the scorers pass the stage's own gathers, which nothing else writes:
    LLaVA-1.5-7B, one image, 4.7 MB of bfloat16)."""
    return Deferred(erank_per_segment, hidden.detach(), keep)


# ----------------------------------------------------------------------------- clustering


def dpc_knn(x: torch.Tensor, clusters: int, k: Optional[int] = None) -> tuple:
    """Density-peaks clustering with k-nearest-neighbour density (DPC-kNN, as used by SparseVLM's
    token recycling). x (r, D) -> (centres (c,) long indices into x, assign (r,) long in 0..c-1).

    density_i = exp(-mean of squared distances to its k nearest neighbours) (distances divided
    by sqrt(D)); delta_i = distance to the nearest denser point (max distance for the densest);
    centres = the ``clusters`` points with the largest density * delta; every point joins its
    nearest centre; each centre joins itself. Density ties break by index (the lower index
    counts as denser; deterministic). Ties are systematic: with k = 2 each pair of mutual nearest
    neighbours has equal density. SparseVLM's released ``cluster_and_merge`` breaks them with
    1e-6 random noise; without a tie-break both points of such a pair would count as peaks.
    Distances are computed element-wise (exactly symmetric, so such ties stay exact).
    """
    r, D = x.shape
    c = max(1, min(int(clusters), r))
    k = c if k is None else k
    k = max(1, min(k, r))
    xf = x.float()
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(max(D, 1))
    knn = dist.topk(k, dim=1, largest=False).values
    density = torch.exp(-(knn ** 2).mean(dim=1))
    # [i, j]: j denser than i; on equal density the lower index counts as denser (a tie-break
    # added to the density, as before, vanished below float32 resolution)
    dj, di = density.unsqueeze(0), density.unsqueeze(1)
    idx = torch.arange(r, device=x.device)
    denser = (dj > di) | ((dj == di) & (idx.unsqueeze(0) < idx.unsqueeze(1)))
    dmax = dist.max()
    delta = torch.where(denser, dist, dmax.expand_as(dist)).min(dim=1).values
    centres = (delta * density).topk(c).indices
    assign = dist[:, centres].argmin(dim=1)
    assign[centres] = torch.arange(c, device=x.device)
    return centres, assign


__all__ = [
    "unit_rows", "nearest_neighbour_distance", "greedy_maxmin", "masked_max_similarity", "cosine_to",
    "erank", "erank_per_segment", "deferred_erank", "dpc_knn",
]
