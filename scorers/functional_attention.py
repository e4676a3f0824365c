"""Attention distributions, for the scorers (pure tensor functions, re-exported by
:mod:`vtoken.scorers.functional`): head mean, per-segment normalisation, entropy, ZipVL's
cumulative-share count, and attention rollout over layers.

Conventions of :mod:`vtoken.scorers.functional` (padded per-segment tensors, ``mask`` (S, n)).
"""

from __future__ import annotations

import torch


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
    a = residual_attention(attn_layers.float(), residual)
    out = None
    for layer in range(a.shape[-3]):
        al = a[..., layer, :, :]
        out = al if out is None else al @ out
    return out


def residual_attention(attn: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """The attention graph's edge weights with the residual stream (Abnar & Zuidema 2020):
    A' = residual * I + (1 - residual) * A, each row renormalised to sum to one.

    attn (..., m, m) -> (..., m, m) in attn's dtype. A zero row (a padding token) becomes the
    identity row (for residual > 0).
    """
    eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    mixed = residual * eye + (1.0 - residual) * attn
    return mixed / mixed.sum(dim=-1, keepdim=True).clamp(min=1e-30)


__all__ = ["head_mean", "normalize_attention", "attention_entropy", "cumulative_share_count", "attention_rollout",
           "residual_attention"]
