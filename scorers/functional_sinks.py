"""Visual sinks, for the scorers (pure tensor functions, re-exported by
:mod:`vtoken.scorers.functional`): RMS normalisation, the hidden dimensions with massive
activations, and the tokens that carry them (VAR, Kang et al. ICLR 2025).

Conventions of :mod:`vtoken.scorers.functional` (padded per-segment tensors, ``mask`` (S, n)).
"""

from __future__ import annotations

from typing import Optional

import torch


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


__all__ = ["rms_normalize", "sink_dimensions", "massive_activation_tokens", "visual_sinks"]
