"""Gather-attend with a dequantising read: attention over a static KV buffer's kept entries (as
:func:`vtoken.kernels.gather_attend`) plus low-bit entries stored quantised beside it — the
mixed-precision KV of ZipVL's decode stage (``DecodeStage(mode="quantize")``) on the static-buffer
engine. The low-bit entries (per-token min-max grid, :mod:`vtoken.kernels.lowbit`) are read through
their own index list and count and dequantised on the fly; every query sees them (they are prompt
entries, before every kept one).

Backends: the PyTorch reference only for now (:func:`vtoken.kernels.reference.gather_attend_lowbit_torch`:
static shapes, no host sync, so a CUDA graph can capture it); ``"auto"`` selects it on every
device, ``"triton"`` raises. A Triton version would run ``gather_attend``'s split-K kernel over the
low entries with the unpacking in its key/value loads and merge both partials by their
log-sum-exp.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vtoken.kernels.checks import check_gather_args, softmax_scale
from vtoken.kernels.dispatch import BACKENDS, torch_reference
from vtoken.kernels.reference import gather_attend_lowbit_torch


class LowBitEntries(NamedTuple):
    """Quantised KV entries: ``k_packed`` / ``v_packed`` ``[B, Hkv, P, D * bits / 8]`` uint8,
    ``k_scale`` / ``k_lo`` / ``v_scale`` / ``v_lo`` ``[B, Hkv, P, 1]``, ``idx [B, n_low]`` int
    indices into P, ``length [B]`` int entries used per sample, ``bits`` (2, 4 or 8)."""

    k_packed: torch.Tensor
    k_scale: torch.Tensor
    k_lo: torch.Tensor
    v_packed: torch.Tensor
    v_scale: torch.Tensor
    v_lo: torch.Tensor
    idx: torch.Tensor
    length: torch.Tensor
    bits: int


def gather_attend_lowbit(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, kept_idx: torch.Tensor,
                         kept_len: torch.Tensor, low: LowBitEntries, *, scale: float | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """``gather_attend(q, k_buf, v_buf, kept_idx, kept_len)`` with the dequantised ``low`` entries
    read before the kept ones. q ``[B, H, Q, D]``, k_buf / v_buf ``[B, Hkv, L, D]``, kept_idx
    ``[B, K]``, kept_len ``[B]`` -> ``[B, H, Q, D]`` in q's dtype."""
    B, H, Hkv, Q, D, L, K = check_gather_args(q, k_buf, v_buf, kept_idx, kept_len)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise RuntimeError("gather_attend_lowbit has no Triton kernel yet: use backend='auto' or 'torch'")
    if kept_idx.dim() != 2:
        raise ValueError(f"gather_attend_lowbit takes one kept list per sample [B, K]; got {tuple(kept_idx.shape)}")
    want = (B, Hkv, low.k_packed.shape[2], D * low.bits // 8)
    for name in ("k_packed", "v_packed"):
        if tuple(getattr(low, name).shape) != want or getattr(low, name).dtype != torch.uint8:
            raise ValueError(f"low.{name} must be uint8 {want}; got {getattr(low, name).dtype} "
                             f"{tuple(getattr(low, name).shape)}")
    if low.idx.dim() != 2 or low.idx.shape[0] != B or tuple(low.length.shape) != (B,):
        raise ValueError(f"low.idx must be [B, n_low] and low.length [B] with B={B}; got "
                         f"{tuple(low.idx.shape)} and {tuple(low.length.shape)}")
    return gather_attend_lowbit_torch(q, k_buf, v_buf, kept_idx, kept_len, low, softmax_scale(scale, D))


gather_attend_lowbit_reference = torch_reference(gather_attend_lowbit)
