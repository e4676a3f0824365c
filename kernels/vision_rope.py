"""Rotary embedding of a Qwen-VL vision tower's q and k in one launch (float32 math, one rounding).

``transformers``' ``apply_rotary_pos_emb_vision`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) casts q and k
``[S, H, Dh]`` and the tables ``[S, Dh]`` to float32, computes ``x * cos + rotate_half(x) * sin``
(half-split rotation) and casts back: about fourteen element-wise kernels a layer over float32
copies. On an H100 at 65,536 patches those passes were most of the tower's ≈ 240 ms of
element-wise time (benchmarks/e2e/qwen_one_image_h100_s7/qwen_tower_profile.txt). :func:`rope_vision`
does the same arithmetic in one kernel: it reads q and k where the fused ``qkv`` projection left
them (strided views), computes in float32 and writes contiguous ``[S, H, Dh]`` outputs in q's dtype.

The PyTorch path (``backend="torch"``) is the formula above, written from it; the Triton kernel
computes each product and the sum in float32 as it does (the compiler may fuse a product and the
sum into one FMA, which can move a float32 result by one step before the final rounding).
"""

from __future__ import annotations

import torch

from vtoken.kernels.checks import check_kernel_dtypes
from vtoken.kernels.dispatch import lazy_jit, next_pow2, resolve_backend, tl, torch_reference
from vtoken.kernels.triton_helpers import rotate_half_rows


def rope_vision(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``q``, ``k`` ``[S, H, Dh]`` (any strides with contiguous head rows), ``cos``, ``sin``
    ``[S, Dh]`` -> rotated ``(q, k)``, contiguous ``[S, H, Dh]`` in their dtype; inputs unchanged."""
    check_kernel_dtypes(same=False, rope_vision_q=q, rope_vision_k=k, rope_vision_cos=cos, rope_vision_sin=sin)
    if q.dim() != 3 or k.shape != q.shape or k.dtype != q.dtype:
        raise ValueError(f"rope_vision: q and k must be [S, H, Dh] of one shape and dtype, got {tuple(q.shape)} "
                         f"{q.dtype} / {tuple(k.shape)} {k.dtype}")
    S, H, Dh = q.shape
    if cos.shape != (S, Dh) or sin.shape != (S, Dh):
        raise ValueError(f"rope_vision: cos and sin must be [{S}, {Dh}], got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if Dh % 2:
        raise ValueError(f"rope_vision: the head dimension must be even, got {Dh}")
    if resolve_backend(backend, q, k, cos, sin) == "torch":
        c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()

        def rotate(x):
            xf = x.float()
            return (xf * c + torch.cat((-xf[..., Dh // 2:], xf[..., : Dh // 2]), dim=-1) * s).to(x.dtype)

        return rotate(q), rotate(k)
    for name, t in (("q", q), ("k", k)):
        if t.stride(2) != 1:
            raise ValueError(f"rope_vision: {name}'s head rows must be contiguous (strides {t.stride()})")
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    lazy_jit(_rope_vision_kernel)[(S, 2)](
        q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), H, Dh,
        BLOCK_H=next_pow2(H), BLOCK_D=next_pow2(Dh // 2))
    return q_out, k_out


def _rope_vision_kernel(Q, K, COS, SIN, QO, KO, sq_s, sq_h, sk_s, sk_h, H, Dh,
                        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)  # 0: q, 1: k
    half = Dh // 2
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    ok = (heads[:, None] < H) & (cols[None, :] < half)
    if which == 0:
        src = Q + s * sq_s + heads[:, None] * sq_h + cols[None, :]
        dst = QO + (s * H + heads[:, None]) * Dh + cols[None, :]
    else:
        src = K + s * sk_s + heads[:, None] * sk_h + cols[None, :]
        dst = KO + (s * H + heads[:, None]) * Dh + cols[None, :]
    row = (s * Dh + cols)[None, :]  # this token's tables, shared by its heads
    # in float32, rounded once (q and k share a dtype)
    rotate_half_rows(src, dst, COS + row, SIN + row, ok, (cols < half)[None, :], half, QO.dtype.element_ty, False)


rope_vision_reference = torch_reference(rope_vision)
