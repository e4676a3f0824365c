"""Gather-attend with a dequantising read: attention over a static KV buffer's kept entries (as
:func:`vtoken.kernels.gather_attend`) plus low-bit entries stored quantised beside it — the
mixed-precision KV of ZipVL's decode stage (``DecodeStage(mode="quantize")``) on the static-buffer
engine. The low-bit entries (per-token min-max grid, :mod:`vtoken.kernels.lowbit`) are read through
their own index list and count and dequantised on the fly; every query sees them (they are prompt
entries, before every kept one).

Backends: the PyTorch reference (:func:`vtoken.kernels.reference.gather_attend_lowbit_torch`) and a
Triton kernel (``_lowbit_kernel``: one program per (sample, KV head, row block) runs the
FlashAttention online softmax first over the low-bit entries, unpacking and dequantising each key /
value tile in registers, then over the kept entries read through their index list; no split-K, so
long kept lists use fewer programs than :func:`~vtoken.kernels.gather_attend`). ``"auto"`` picks
Triton on CUDA (as every vtoken kernel), the reference elsewhere; both have static shapes and no
host sync (CUDA-graph safe). The Triton kernel is tested against the reference through Triton's
interpreter on the CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vtoken.kernels.checks import check_gather_args, check_kernel_dtypes, index_tensor, softmax_scale
from vtoken.kernels.dispatch import cdiv, lazy_jit, next_pow2, resolve_backend, tl, torch_reference
from vtoken.kernels.gather_attend import _launch_shapes
from vtoken.kernels.reference import gather_attend_lowbit_torch
from vtoken.kernels.triton_helpers import LOG2E, accumulate_pv, attend_block, dot_qk, normalize_rows, softmax_step


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
    scale = softmax_scale(scale, D)
    tensors = (q, k_buf, v_buf, kept_idx, kept_len, low.k_packed, low.v_packed, low.idx, low.length)
    if resolve_backend(backend, *tensors) == "torch":
        return gather_attend_lowbit_torch(q, k_buf, v_buf, kept_idx, kept_len, low, scale)
    check_kernel_dtypes(q=q, k_buf=k_buf, v_buf=v_buf)
    return _gather_attend_lowbit_triton(q, k_buf, v_buf, kept_idx, kept_len, low, scale)


gather_attend_lowbit_reference = torch_reference(gather_attend_lowbit)


def _lowbit_kernel(
    Q, KB, VB, IDX, KLEN, O,
    KP, KS, KL, VP, VS, VL, LIDX, LLEN,
    sqb, sqh, sqn, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sib, sik,
    sob, soh, son, sod,
    spb, sph, spl, spd,
    ssb, ssh, ssl,
    slb, slk,
    Hkv, G, QL, M_TOT, K_MAX, L_BUF, N_LOW, P_LOW, qk_scale,
    BITS: tl.constexpr, PER: tl.constexpr, IEEE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bk // Hkv).to(tl.int64)
    kvh = (pid_bk % Hkv).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = g * QL + i
    m_ok = offs_m < M_TOT
    qi = offs_m % QL
    h = kvh * G + offs_m // QL
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h[:, None] * sqh + qi[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # 1. the low-bit entries (every query sees them), dequantised tile by tile
    nlow = tl.minimum(tl.load(LLEN + b).to(tl.int32), N_LOW)
    byte = offs_d // PER
    shift = ((offs_d % PER) * BITS).to(tl.uint8)
    for start_n in range(0, nlow, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < nlow
        li = tl.load(LIDX + b * slb + offs_n * slk, mask=n_ok, other=0).to(tl.int64)
        li = tl.minimum(tl.maximum(li, 0), P_LOW - 1)
        tile = n_ok[:, None] & d_ok[None, :]
        rows = b * spb + kvh * sph + li[:, None] * spl + byte[None, :] * spd
        srow = b * ssb + kvh * ssh + li * ssl
        codes = ((tl.load(KP + rows, mask=tile, other=0) >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        k = (tl.load(KL + srow, mask=n_ok, other=0.0).to(tl.float32)[:, None]
             + codes * tl.load(KS + srow, mask=n_ok, other=0.0).to(tl.float32)[:, None])
        k = k.to(KS.dtype.element_ty).to(KB.dtype.element_ty)
        s = dot_qk(q, k, IEEE)
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        codes = ((tl.load(VP + rows, mask=tile, other=0) >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        v = (tl.load(VL + srow, mask=n_ok, other=0.0).to(tl.float32)[:, None]
             + codes * tl.load(VS + srow, mask=n_ok, other=0.0).to(tl.float32)[:, None])
        v = v.to(VS.dtype.element_ty).to(VB.dtype.element_ty)  # rows past the list loaded as 0 (code, scale, lo)
        m_i, alpha, p, l_i = softmax_step(m_i, l_i, s)
        acc = accumulate_pv(acc, alpha, p, v, IEEE)

    # 2. the kept entries through their index list (causal within it, as gather_attend)
    klen = tl.minimum(tl.load(KLEN + b).to(tl.int32), K_MAX)
    limit = klen - QL + qi
    k_base = KB + b * skb + kvh * skh
    v_base = VB + b * svb + kvh * svh
    for start_n in range(0, klen, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < klen
        idx = tl.load(IDX + b * sib + offs_n * sik, mask=n_ok, other=0).to(tl.int64)
        idx = tl.minimum(tl.maximum(idx, 0), L_BUF - 1)
        k = tl.load(k_base + idx[:, None] * skl + offs_d[None, :] * skd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = dot_qk(q, k, IEEE)
        s = tl.where(n_ok[None, :] & (offs_n[None, :] <= limit[:, None]), s * qk_scale, float("-inf"))
        m_i, l_i, acc = attend_block(m_i, l_i, acc, s, v_base, idx, svl, offs_d, svd,
                                     n_ok[:, None] & d_ok[None, :], IEEE)

    out = normalize_rows(acc, l_i)
    tl.store(O + b * sob + h[:, None] * soh + qi[:, None] * son + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _gather_attend_lowbit_triton(q, k_buf, v_buf, kept_idx, kept_len, low, scale):
    # Host side: shapes, strides and dtypes only; no host sync (CUDA-graph safe).
    (B, H, Hkv, G, Q, D, K, M_TOT, interp), out, empty = _launch_shapes(q, k_buf, kept_idx)
    if empty:
        return out
    block_m = min(64, max(16, next_pow2(M_TOT)))
    # one set of strides for both packed tensors and for the four scale / offset tensors (no-ops when
    # contiguous, as quantize_tokens makes them)
    k_packed, k_scale, k_lo, v_packed, v_scale, v_lo = (t.contiguous() for t in low[:6])
    lowbit_args = (k_packed, k_scale, k_lo, v_packed, v_scale, v_lo, low.idx, index_tensor(low.length, q.device))
    lazy_jit(_lowbit_kernel)[(B * Hkv, cdiv(M_TOT, block_m))](
        q, k_buf, v_buf, kept_idx, index_tensor(kept_len, q.device), out, *lowbit_args,
        *q.stride(), *k_buf.stride(), *v_buf.stride(), *kept_idx.stride(), *out.stride(),
        *k_packed.stride(), *k_scale.stride()[:3], *low.idx.stride(),
        Hkv, G, Q, M_TOT, K, k_buf.shape[2], low.idx.shape[-1], k_packed.shape[2], scale * LOG2E,
        BITS=low.bits, PER=8 // low.bits, IEEE=q.dtype == torch.float32,
        HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)), BLOCK_M=block_m, BLOCK_N=16 if interp else 64,
        num_warps=4, num_stages=1 if interp else 2,
    )
    return out
