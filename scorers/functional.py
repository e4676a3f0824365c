"""Pure tensor functions the scorers are built from (no scorer state, no model access).

Every function works on padded per-segment tensors: ``mask`` (S, n) bool marks the real
candidate slots of each segment; padding slots never influence a result and are never chosen.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

#: chunk of rows used when an (n x n) similarity would not fit comfortably in memory
_CHUNK = 1024


# ----------------------------------------------------------------------------- attention


def head_mean(attn: torch.Tensor) -> torch.Tensor:
    """(S, H, n) attention probabilities -> (S, n) float32 mean over heads."""
    return attn.float().mean(dim=1)


def normalize_attention(att: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(S, n) non-negative scores -> (S, n) distribution over each segment's real slots.

    A segment whose scores are all zero gets the uniform distribution. Padding slots are 0.
    """
    a = att.float().clamp(min=0).masked_fill(~mask, 0.0)
    total = a.sum(dim=1, keepdim=True)
    uniform = mask.float() / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, a / total.clamp(min=torch.finfo(torch.float32).tiny), uniform)


def attention_entropy(att: torch.Tensor, mask: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Shannon entropy of each segment's attention distribution over its real slots.

    att (S, n) non-negative (normalised here), mask (S, n) -> (S,) float32. With
    ``normalized=True`` the entropy is divided by log(count), so 0 = all mass on one token and
    1 = uniform (a segment with a single candidate has entropy 0).
    """
    p = normalize_attention(att, mask)
    h = -(p * torch.log(p.clamp(min=1e-30))).masked_fill(~mask, 0.0).sum(dim=1)
    if normalized:
        count = mask.sum(dim=1).float()
        h = torch.where(count > 1, h / torch.log(count.clamp(min=2)), torch.zeros_like(h))
    return h


def cumulative_share_count(att: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Smallest number of top tokens whose normalised attention sums to >= ``threshold``.

    att (S, n), mask (S, n) -> (S,) long, at least 1 for a segment with candidates (ZipVL's
    adaptive ratio, He et al. 2024, eq. "p = min{p : sum_{j<=p} a_sorted(j) >= tau}").
    """
    p = normalize_attention(att, mask)
    srt = torch.sort(p, dim=1, descending=True).values
    csum = srt.cumsum(dim=1)
    # float tolerance: a share that reaches the threshold up to rounding counts as reaching it
    reached = csum >= (threshold - 1e-6)
    count = torch.where(reached.any(dim=1), reached.float().argmax(dim=1) + 1, mask.sum(dim=1))
    return torch.minimum(count, mask.sum(dim=1)).clamp(min=1).long()


# ----------------------------------------------------------------------------- similarity


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the last axis (float32)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def nearest_neighbour_distance(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """For unit features z (S, n, D): each real slot's cosine distance (1 - cos) to its nearest
    OTHER real slot; (S, n), +inf where a segment has a single candidate, +inf on padding.

    Computed in row chunks so the (n x n) matrix is never held at once for large n.
    """
    S, n, _ = z.shape
    out = torch.full((S, n), float("inf"), dtype=torch.float32, device=z.device)
    ar = torch.arange(n, device=z.device)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        d = 1.0 - z[:, start:stop] @ z.transpose(1, 2)  # (S, c, n)
        d = d.masked_fill(~mask.unsqueeze(1), float("inf"))
        d[:, ar[start:stop] - start, ar[start:stop]] = float("inf")  # not its own neighbour
        out[:, start:stop] = d.min(dim=2).values
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
    S, n = mask.shape
    dev = mask.device
    z = unit_rows(features)
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
        mind = 1.0 - masked_max_similarity(z, seed)[0]
    need_first = picked == 0
    first_score = None
    if bool(need_first.any()):
        first_score = nearest_neighbour_distance(z, mask)
    steps = int((budget - picked).clamp(min=0).max()) if S else 0
    # every step runs on all rows with static shapes (a row that has its budget changes nothing):
    # no host sync inside the loop, about a dozen small kernels per step
    for _ in range(steps):
        active = picked < budget  # (S,)
        base = mind if first_score is None else torch.where((picked == 0).unsqueeze(1), first_score, mind)
        score = base.masked_fill(~mask | keep, float("-inf"))
        # +inf (a lone candidate has no neighbour) -> large finite, so argmax still prefers real slots
        pick = score.clamp(max=1e30).argmax(dim=1, keepdim=True)  # (S, 1)
        chosen = torch.zeros_like(keep).scatter_(1, pick, active.unsqueeze(1))
        keep |= chosen
        order = torch.where(chosen, picked.unsqueeze(1), order)
        zp = z.gather(1, pick.unsqueeze(-1).expand(-1, 1, z.shape[-1]))  # (S, 1, D)
        d = 1.0 - (z @ zp.transpose(1, 2)).squeeze(-1)  # (S, n)
        mind = torch.where(active.unsqueeze(1), torch.minimum(mind, d), mind)
        picked = picked + active.long()
    return keep, order


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
    """erank of each segment's kept rows: hidden (S, n, D), keep (S, n) bool -> (S,) float32."""
    if keep.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=hidden.device)
    return torch.stack([erank(hidden[s][keep[s]]) for s in range(keep.shape[0])])


# ----------------------------------------------------------------------------- information flow


def attention_rollout(attn_layers: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

    attn_layers (Lyr, m, m) row-stochastic attention (heads already averaged), layer 0 first
    -> (m, m) rollout R = A'_{Lyr-1} @ ... @ A'_1 @ A'_0 with A'_l = residual*I + (1-residual)*A_l,
    rows renormalised. R[i, j] is how much of token j's input reaches token i at the top.
    Leading batch axes are allowed: (..., Lyr, m, m) -> (..., m, m).
    """
    if attn_layers.dim() < 3:
        raise ValueError(f"attention_rollout expects (..., layers, m, m); got shape {tuple(attn_layers.shape)}")
    a = attn_layers.float()
    m = a.shape[-1]
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    out = None
    for layer in range(a.shape[-3]):
        al = residual * eye + (1.0 - residual) * a[..., layer, :, :]
        al = al / al.sum(dim=-1, keepdim=True).clamp(min=1e-30)
        out = al if out is None else al @ out
    return out


# ----------------------------------------------------------------------------- debiasing


def positional_trend(
    scores: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kind: str = "exp"
) -> torch.Tensor:
    """Least-squares fit of each segment's score-vs-position trend; returns the fitted trend (S, n).

    scores (S, n) >= 0, positions (S, n) (e.g. the token's original index), mask (S, n).
    ``kind="exp"``: log(score + eps) = a + b*x (an exponential recency trend, as in Attention
    Debiasing); ``kind="linear"``: score = a + b*x, clamped below at 5% of the mean score.
    Positions are rescaled to [0, 1] per segment. Padding slots get 1.
    """
    if kind not in ("exp", "linear"):
        raise ValueError(f"trend kind must be 'exp' or 'linear'; got {kind!r}")
    y = scores.float().clamp(min=0)
    m = mask.float()
    cnt = m.sum(dim=1, keepdim=True).clamp(min=1)
    x = positions.float()
    xmin = torch.where(mask, x, torch.full_like(x, float("inf"))).min(dim=1, keepdim=True).values
    xmax = torch.where(mask, x, torch.full_like(x, float("-inf"))).max(dim=1, keepdim=True).values
    span = (xmax - xmin).clamp(min=1)
    x = torch.where(mask, (x - xmin) / span, torch.zeros_like(x))
    mean_y = (y * m).sum(dim=1, keepdim=True) / cnt
    if kind == "exp":
        eps = 1e-3 * mean_y.clamp(min=1e-12)
        t = torch.log(y + eps)
    else:
        t = y
    mx = (x * m).sum(dim=1, keepdim=True) / cnt
    mt = (t * m).sum(dim=1, keepdim=True) / cnt
    cov = (((x - mx) * (t - mt)) * m).sum(dim=1, keepdim=True)
    var = (((x - mx) ** 2) * m).sum(dim=1, keepdim=True)
    b = torch.where(var > 0, cov / var.clamp(min=1e-30), torch.zeros_like(cov))
    a = mt - b * mx
    fit = a + b * x
    if kind == "exp":
        trend = torch.exp(fit)
    else:
        trend = fit.clamp(min=0.05 * mean_y.clamp(min=1e-12))
    return torch.where(mask, trend, torch.ones_like(trend))


def remove_positional_trend(
    scores: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kind: str = "exp"
) -> torch.Tensor:
    """scores / fitted positional trend (see :func:`positional_trend`), (S, n); a score that is
    high only because of its position is brought back to the level of its neighbours."""
    trend = positional_trend(scores, positions, mask, kind=kind)
    return scores.float().clamp(min=0) / trend.clamp(min=1e-30)


def empty_tokens(
    hidden: torch.Tensor, mask: torch.Tensor, similarity: float = 0.99, min_share: float = 0.05, min_group: int = 4
) -> torch.Tensor:
    """Candidates that look like padding / empty background: (S, n) bool.

    A real slot is "empty" when at least ``max(min_group, min_share * count)`` other slots of its
    segment have almost the same hidden state (cosine >= ``similarity``): padding patches (and
    large flat areas) produce many near-identical visual tokens, content patches do not. For
    segments of more than 4096 candidates the duplicates are counted among 1024 evenly strided
    reference slots and the threshold is scaled accordingly.
    """
    S, n, _ = hidden.shape
    z = unit_rows(hidden)
    out = torch.zeros((S, n), dtype=torch.bool, device=hidden.device)
    for s in range(S):
        slots = mask[s].nonzero().flatten()
        c = slots.numel()
        if c < 2:
            continue
        zs = z[s, slots]
        need = max(min_group, math.ceil(min_share * c))
        refs = torch.arange(c, device=hidden.device)
        if c > 4096:
            refs = torch.linspace(0, c - 1, 1024, dtype=torch.float64, device=hidden.device).round().long()
            need = max(min_group, math.ceil(min_share * refs.numel()))
        zr = zs[refs]
        dup = torch.zeros(c, dtype=torch.long, device=hidden.device)
        for start in range(0, c, _CHUNK):
            sim = zs[start:start + _CHUNK] @ zr.T  # (chunk, r)
            dup[start:start + _CHUNK] = (sim >= similarity).sum(dim=1)
        # every slot matches itself when it is a reference slot
        is_ref = torch.zeros(c, dtype=torch.bool, device=hidden.device)
        is_ref[refs] = True
        dup = dup - is_ref.long()
        out[s, slots] = dup >= need
    return out


# ----------------------------------------------------------------------------- sinks


def rms_normalize(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """h / RMS(h) over the last axis (float32): a dimension of value tau is tau times the RMS."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)


def sink_dimensions(
    hidden: torch.Tensor, mask: torch.Tensor, tau: float = 20.0, num_dims: int = 2,
    text_hidden: Optional[torch.Tensor] = None, text_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Hidden dimensions with massive activations, per segment: (S, num_dims) long, -1 = none.

    A dimension qualifies when some token of the segment (visual, or its sample's text tokens
    if given) reaches |rms_normalize(h)_d| > tau there; the ``num_dims`` dimensions with the
    largest such activation are returned (VAR fixes these per model from the BOS token's
    massive activations; here they are found from the data).
    """
    r = rms_normalize(hidden).abs().masked_fill(~mask.unsqueeze(-1), 0.0)
    peak = r.max(dim=1).values  # (S, D)
    if text_hidden is not None and text_mask is not None and text_hidden.shape[1] > 0:
        rt = rms_normalize(text_hidden).abs().masked_fill(~text_mask.unsqueeze(-1), 0.0)
        peak = torch.maximum(peak, rt.max(dim=1).values)
    k = min(num_dims, peak.shape[1])
    val, dims = peak.topk(k, dim=1)
    return torch.where(val > tau, dims, torch.full_like(dims, -1))


def massive_activation_tokens(h: torch.Tensor, dims: torch.Tensor, tau: float = 20.0) -> torch.Tensor:
    """Tokens with |rms_normalize(h)_d| > tau in one of the segment's sink ``dims``.

    h (S, n, D), dims (S, k) long (-1 = unused) -> (S, n) bool.
    """
    if dims.numel() == 0 or h.shape[1] == 0:
        return torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
    r = rms_normalize(h).abs()
    vals = r.gather(2, dims.clamp(min=0).unsqueeze(1).expand(-1, h.shape[1], -1))  # (S, n, k)
    vals = vals.masked_fill((dims < 0).unsqueeze(1), 0.0)
    return vals.max(dim=2).values > tau


def visual_sinks(
    hidden: torch.Tensor, mask: torch.Tensor, tau: float = 20.0, num_dims: int = 2, dims: Optional[list] = None,
    text_hidden: Optional[torch.Tensor] = None, text_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Visual sink tokens (VAR, Kang et al. ICLR 2025): (S, n) bool, never True on padding.

    ``dims``: fixed sink dimensions (list of ints) or None to detect them with
    :func:`sink_dimensions`.
    """
    if dims is not None:
        d = torch.tensor(list(dims), dtype=torch.long, device=hidden.device).expand(hidden.shape[0], -1)
    else:
        d = sink_dimensions(hidden, mask, tau, num_dims, text_hidden, text_mask)
    return massive_activation_tokens(hidden, d, tau) & mask


# ----------------------------------------------------------------------------- clustering


def dpc_knn(x: torch.Tensor, clusters: int, k: Optional[int] = None) -> tuple:
    """Density-peaks clustering with k-nearest-neighbour density (DPC-kNN, as used by SparseVLM's
    token recycling). x (r, D) -> (centres (c,) long indices into x, assign (r,) long in 0..c-1).

    density_i = exp(-mean of squared distances to its k nearest neighbours) (distances divided
    by sqrt(D)); delta_i = distance to the nearest denser point (max distance for the densest);
    centres = the ``clusters`` points with the largest density * delta; every point joins its
    nearest centre; each centre joins itself. Density ties break by index (deterministic).
    """
    r, D = x.shape
    c = max(1, min(int(clusters), r))
    k = c if k is None else k
    k = max(1, min(k, r))
    xf = x.float()
    dist = torch.cdist(xf, xf) / math.sqrt(max(D, 1))
    knn = dist.topk(k, dim=1, largest=False).values
    density = torch.exp(-(knn ** 2).mean(dim=1))
    # deterministic tie-break: earlier index counts as slightly denser
    density = density + torch.arange(r, 0, -1, device=x.device, dtype=density.dtype) * 1e-9
    denser = density.unsqueeze(0) > density.unsqueeze(1)  # [i, j]: j denser than i
    dmax = dist.max()
    delta = torch.where(denser, dist, dmax.expand_as(dist)).min(dim=1).values
    centres = (delta * density).topk(c).indices
    assign = dist[:, centres].argmin(dim=1)
    assign[centres] = torch.arange(c, device=x.device)
    return centres, assign


__all__ = [
    "head_mean",
    "normalize_attention",
    "attention_entropy",
    "cumulative_share_count",
    "unit_rows",
    "nearest_neighbour_distance",
    "greedy_maxmin",
    "masked_max_similarity",
    "cosine_to",
    "erank",
    "erank_per_segment",
    "attention_rollout",
    "positional_trend",
    "remove_positional_trend",
    "empty_tokens",
    "rms_normalize",
    "sink_dimensions",
    "massive_activation_tokens",
    "visual_sinks",
    "dpc_knn",
]
