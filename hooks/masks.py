"""Attention masks for the layers after a pruning stage.

The model's own mask covers the unpruned sequence; layers after a stage see a shorter,
re-padded sequence (new padding on the left), so they get a mask built here from the kept
tokens' validity. Format follows the layer's attention implementation: boolean (True =
attend) for SDPA and friends, additive float for eager.
"""

from __future__ import annotations

from typing import Optional

import torch


def prefill_mask(valid: torch.Tensor, attn_impl: str, dtype: torch.dtype,
                 all_valid: Optional[bool] = None) -> Optional[torch.Tensor]:
    """Causal mask over a re-laid-out sequence.

    valid (B, N) bool -> (B, 1, N, N) mask, or None when every token is valid and the
    implementation applies causality itself (SDPA's ``is_causal``). Each query also sees itself
    so rows of padding queries are never empty (no NaN). ``all_valid``: ``valid.all()`` when the
    caller knows it (saves a device sync).
    """
    if all_valid is None:
        all_valid = bool(valid.all())
    if attn_impl != "eager" and all_valid:
        return None
    N = valid.shape[1]
    causal = torch.ones(N, N, dtype=torch.bool, device=valid.device).tril_()
    allowed = causal.unsqueeze(0) & valid.unsqueeze(1)
    allowed |= torch.eye(N, dtype=torch.bool, device=valid.device).unsqueeze(0)
    return _format(allowed.unsqueeze(1), attn_impl, dtype)


def fixed_prefill_mask(valid: torch.Tensor, slots: int, attn_impl: str, dtype: torch.dtype) -> torch.Tensor:
    """The causal mask of a re-laid-out prefill whose layer writes into a fixed-slot cache: the
    layer attends over all its ``slots`` (the N written now first, then empty ones).

    valid (B, N) bool -> (B, 1, N, slots): :func:`prefill_mask`'s columns, then ``slots - N`` never
    attended (always explicit: the keys are longer than the queries)."""
    B, N = valid.shape
    causal = torch.ones(N, N, dtype=torch.bool, device=valid.device).tril_()
    allowed = causal.unsqueeze(0) & valid.unsqueeze(1)
    allowed |= torch.eye(N, dtype=torch.bool, device=valid.device).unsqueeze(0)
    allowed = torch.cat([allowed, allowed.new_zeros(B, N, slots - N)], dim=2)
    return _format(allowed.unsqueeze(1), attn_impl, dtype)


def fixed_decode_mask(prefix_valid: torch.Tensor, written: torch.Tensor, q_len: int, slots: int, attn_impl: str,
                      dtype: torch.dtype) -> torch.Tensor:
    """Mask of ``q_len`` new queries in a pruned layer of a fixed-slot cache (transformers'
    StaticCache), from tensors only: no host sync, the same graph every step (a compiled or
    CUDA-graphed decode step traces it).

    prefix_valid (B, N) bool: the pruned prefill's slots; ``written`` 0-d long: slots the layer
    holds before this step (its ``cumulative_length``: N + tokens since the prefill); the layer
    has ``slots`` in all. -> (B, 1, q_len, slots): the valid prefill slots, and the new tokens'
    slots up to each query's own (tokens ``generate`` appends are all valid)."""
    B, N = prefix_valid.shape
    new = torch.arange(slots - N, device=prefix_valid.device).view(1, -1)
    last = (written - N) + torch.arange(q_len, device=prefix_valid.device).view(-1, 1)  # (q, 1) own slot - N
    allowed = torch.cat([prefix_valid.view(B, 1, 1, N).expand(B, 1, q_len, N),
                         (new <= last).view(1, 1, q_len, -1).expand(B, 1, q_len, slots - N)], dim=3)
    return _format(allowed, attn_impl, dtype)


def extend_mask(
    prefix_valid: torch.Tensor,
    new_valid: torch.Tensor,
    q_len: int,
    attn_impl: str,
    dtype: torch.dtype,
    prefix_all_valid: bool = False,
) -> Optional[torch.Tensor]:
    """Mask for ``q_len`` new queries against a pruned cache.

    prefix_valid (B, P) validity of the pruned prefill; new_valid (B, M) validity of the tokens
    added since (the last ``q_len`` of them are the queries). -> (B, 1, q_len, P + M) or None
    (single query, nothing to mask, non-eager).

    ``prefix_all_valid`` (known once at prefill) lets a one-token decode step skip the mask
    without a device sync; tokens appended by ``generate`` are always valid.
    """
    if attn_impl != "eager" and q_len == 1 and prefix_all_valid:
        return None
    keys = torch.cat([prefix_valid, new_valid.to(prefix_valid.device)], dim=1)
    K = keys.shape[1]
    qpos = torch.arange(K - q_len, K, device=keys.device).view(q_len, 1)
    causal = torch.arange(K, device=keys.device).view(1, K) <= qpos  # (q, K)
    allowed = causal.unsqueeze(0) & keys.unsqueeze(1)
    allowed |= (torch.arange(K, device=keys.device).view(1, K) == qpos).unsqueeze(0)
    return _format(allowed.unsqueeze(1), attn_impl, dtype)


def _format(allowed: torch.Tensor, attn_impl: str, dtype: torch.dtype) -> torch.Tensor:
    if attn_impl == "eager":
        out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)
    return allowed


def decode_step_masks(state, mask2d: Optional[torch.Tensor], q: int, batch: int, attn_impl: str,
                      dtype: torch.dtype, device) -> list:
    """One decode step's masks, one per stage of the pruned prefix ``state`` (a
    :class:`vtoken.hooks.call_state.PruneState`, whose ``extra`` is advanced by the step's ``q``
    new tokens): the prefix's validity after that stage, then the tokens appended since the
    prefill (valid per the 2-D ``mask2d`` (B, original length + extra), all valid without one)."""
    state.extra += q
    if mask2d is not None:
        new_valid = mask2d[:, -state.extra:].bool()
    else:
        new_valid = torch.ones(batch, state.extra, dtype=torch.bool, device=device)
    return [extend_mask(s.valid, new_valid, q, attn_impl, dtype, s.all_valid) for s in state.stages]


def unwrap_mask(mask):
    """transformers' dict of masks per attention type (``{"full_attention": ...}``) -> the full
    attention's (None where it needs no mask); anything else as it is."""
    if isinstance(mask, dict):
        return mask.get("full_attention", next(iter(mask.values()), None))
    return mask


def key_validity(mask) -> Optional[torch.Tensor]:
    """(B, N) validity of the keys an attention mask allows (nonzero / True = valid): a 2-D padding mask as it is; a
    4-D mask (B, 1, q, N) (bool, True = attend, or additive float, 0 = attend) or transformers'
    dict of them (``{"full_attention": ...}``) read from its last query row, which a causal mask
    lets see every valid key. None for anything else."""
    mask = unwrap_mask(mask)
    if not torch.is_tensor(mask):
        return None
    if mask.dim() == 2:
        return mask  # callers convert what they use (a decode step only its new columns)
    if mask.dim() != 4:
        return None
    row = mask[:, 0, -1, :]
    return row if row.dtype == torch.bool else row == 0
