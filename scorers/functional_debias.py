"""Attention Debiasing, for the scorers (pure tensor functions, re-exported by
:mod:`vtoken.scorers.functional`): the positional (recency) trend of attention scores and its
removal, and the detection of empty / padding tokens from their hidden states.

Conventions of :mod:`vtoken.scorers.functional` (padded per-segment tensors, ``mask`` (S, n)).
"""

from __future__ import annotations

import math

import torch

from vtoken.scorers.functional_diversity import ROW_CHUNK, unit_rows


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
        for start in range(0, c, ROW_CHUNK):
            sim = zs[start:start + ROW_CHUNK] @ zr.T  # (chunk, r)
            dup[start:start + ROW_CHUNK] = (sim >= similarity).sum(dim=1)
        # every slot matches itself when it is a reference slot
        is_ref = torch.zeros(c, dtype=torch.bool, device=hidden.device)
        is_ref[refs] = True
        dup = dup - is_ref.long()
        out[s, slots] = dup >= need
    return out


__all__ = ["positional_trend", "remove_positional_trend", "empty_tokens"]
