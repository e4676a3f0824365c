"""Visual sinks, for the scorers (pure tensor functions, re-exported by
:mod:`vtoken.scorers.functional`), by three rules (:data:`SINK_RULES`):

* ``"var"`` -- RMS normalisation, the hidden dimensions with massive activations, and the tokens
  that carry them (VAR, Kang et al. ICLR 2025): :func:`visual_sinks`;
* ``"act"`` -- tokens whose attention received, averaged over the queries that see them, passes
  a threshold in some head (ACT, Yu et al. ICML 2024): :func:`act_sinks`;
* ``"secondary"`` -- tokens whose hidden state points along the primary sink's (secondary sinks,
  Wong et al. 2025): :func:`secondary_sinks`.

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


def act_sinks(attn_text: torch.Tensor, text_after: torch.Tensor, mask: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Hidden attention sinks by ACT's rule (Yu et al., "Unveiling and Harnessing Hidden Attention
    Sinks: Training-Free Attention Calibration", ICML 2024, arXiv:2406.15765): (S, n) bool.

    ACT's released code (GATECH-EIC/ACT, ``models/llama_modelling_aug.py``) marks, per layer and
    head, the key columns j whose attention summed over the causal map's rows and divided by the
    number of rows that can see j (N - j) exceeds ``THRES`` (0.1 in its scripts), and drops the
    first column found (the BOS token). Deviations, from the signals a scorer has: one layer (the
    stage's K-1) instead of every layer; the rows are the text queries that follow the segment
    (``text_after``; each sees every candidate), not every query -- the visual tokens' own rows
    are not a signal -- so the average is over those rows; a candidate is a sink when it passes
    ``tau`` in at least one head (ACT keeps per-head sets and calibrates only heads chosen by an
    offline search; a pruning decision is per token); nothing is dropped as the BOS, which is
    never a visual candidate.

    attn_text (S, H, T, n) attention of each text row to each candidate, text_after (S, T) bool,
    mask (S, n) bool. A segment with no text row after it has no ACT sinks.
    """
    rows = text_after.to(attn_text.dtype).unsqueeze(1).unsqueeze(-1)  # (S, 1, T, 1)
    count = text_after.sum(dim=1).clamp(min=1).to(torch.float32).view(-1, 1, 1)
    received = (attn_text.float() * rows).sum(dim=2) / count  # (S, H, n)
    return (received > tau).any(dim=1) & mask & text_after.any(dim=1, keepdim=True)


def primary_sink(text_hidden: torch.Tensor, text_mask: torch.Tensor, window: int = 3) -> torch.Tensor:
    """(S,) text row of the primary sink: of the sample's first ``window`` text tokens (in
    sequence order), the one with the largest hidden-state L2 norm (-1 where there is no text)."""
    norms = text_hidden.float().norm(dim=-1).masked_fill(~text_mask, -1.0)[:, :window]
    return torch.where(text_mask.any(dim=1), norms.argmax(dim=1), torch.full_like(norms[:, 0], -1).long())


def secondary_sinks(
    hidden: torch.Tensor, mask: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor,
    cos: float = 0.9, window: int = 3,
) -> torch.Tensor:
    """Secondary attention sinks (Wong et al., "On the Existence and Behaviour of Secondary
    Attention Sinks", arXiv:2512.22213): (S, n) bool.

    The authors' detector (JeffreyWong20/Secondary-Attention-Sinks, ``hidden_state_norm_detection``)
    takes the primary (BOS) sink as the highest-norm hidden state among the first sequence
    positions (0..2 with a chat template) and marks, at each layer, every later token whose hidden
    state has |cosine similarity| > 0.9 with the primary sink's, within the layers where the
    primary sink is active (from its largest norm rise to its largest drop); its labelling then
    calls a token secondary when it stays a sink for more than 4 and fewer than L - 15 layers.
    Here, with the hidden states of one layer as the signal: the primary sink is
    :func:`primary_sink` among the sample's first ``window`` text tokens (the first positions of
    a VLM prompt are text), and a candidate is a secondary sink when |cos(h_j, h_primary)| >
    ``cos`` at the stage's layer; there is no layer window and no lifetime test, so a token
    aligned with the primary sink at that layer counts whatever its lifetime. The paper finds
    secondary sinks mostly in middle layers: the rule finds them at stages placed there.

    hidden (S, n, D), mask (S, n), text_hidden (S, T, D), text_mask (S, T) -> (S, n) bool.
    """
    first = primary_sink(text_hidden, text_mask, window)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    ref = text_hidden[rows, first.clamp(min=0)].float()  # (S, D)
    sim = torch.nn.functional.cosine_similarity(hidden.float(), ref.unsqueeze(1), dim=-1)  # (S, n)
    return (sim.abs() > cos) & mask & (first >= 0).unsqueeze(1)


#: the sink rules (``sink_rule`` of the attention scorers) and each rule's default threshold
SINK_RULES = {"var": 20.0, "act": 0.1, "secondary": 0.9}


__all__ = ["rms_normalize", "sink_dimensions", "massive_activation_tokens", "visual_sinks", "act_sinks",
           "primary_sink", "secondary_sinks", "SINK_RULES"]
