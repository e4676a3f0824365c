"""Fused element-wise ops of a Llama-style decoder layer, for the static decode step.

A captured decode step of a 7B model at batch 32 runs about 1,100 small kernels besides its GEMMs
and attention (README, "Two decode paths"): ``transformers``' RMSNorm is six element-wise kernels,
its rotary embedding five per tensor, the SwiGLU gate two, each residual add one. These kernels do
each group in one launch, in the manner of Liger-Kernel's fused RMSNorm / RoPE / SwiGLU (Hsu et
al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024), forward only:

- :func:`add_rms_norm` ``(x, residual, weight, eps) -> (normed, x + residual)``: the residual add
  of the previous sub-layer and the RMSNorm of the next (Zhang & Sennrich, 2019), as
  ``LlamaRMSNorm``: statistics in float32, the normalised row rounded to the input dtype before
  the weight multiplies it.
- :func:`rope_qk` ``(q, k, cos, sin) -> (q', k')``: rotary embedding (Su et al., RoFormer, 2021) of
  queries and keys in one launch, ``x * cos + rotate_half(x) * sin`` written with ``transformers``'
  rounding (each product and the sum rounded to the input dtype; the compiled GPU kernel may keep
  a product in float32, one bfloat16 step from ``transformers`` on a few entries).
- :func:`rope_qk_store`: the same rotation for one decode token, reading q / k / v where the
  projections left them and writing the rotated key and the value into the static KV buffers at
  the step's slot (one launch instead of six a layer).
- :func:`silu_mul` ``(gate, up) -> silu(gate) * up`` (Shazeer, "GLU Variants Improve
  Transformer", 2020), ``silu`` rounded to the input dtype before the product, as
  ``act_fn(gate_proj(x)) * up_proj(x)``.

Shapes: rows are the last axis ``D`` of contiguous tensors; ``q [B, H, S, Dh]``, ``k [B, Hkv, S,
Dh]``, ``cos``/``sin`` ``[B, S, Dh]`` (what a ``transformers`` rotary embedding returns; M-RoPE's
``[3, B, S, Dh]`` is not accepted: pass one component, which is exact for decode tokens whose three
position components are equal). Each op has its PyTorch reference beside it (``*_reference``) and
runs on the CPU through Triton's interpreter in the tests.
"""

from __future__ import annotations

import torch

from vtoken.kernels.checks import check_kernel_dtypes
from vtoken.kernels.dispatch import lazy_jit, next_pow2, resolve_backend, tl, torch_reference
from vtoken.kernels.triton_helpers import rotate_half_rows

def _check_rows(name: str, *tensors) -> None:
    """Kernel dtypes (:func:`~vtoken.kernels.checks.check_kernel_dtypes`) and contiguous rows."""
    given = [t for t in tensors if t is not None]
    check_kernel_dtypes(same=False, **{f"{name} argument {i}": t for i, t in enumerate(given)})
    for t in given:
        if not t.is_contiguous():
            raise ValueError(f"{name}: contiguous tensors expected (shape {tuple(t.shape)}, strides {t.stride()})")


# ------------------------------------------------------------------------------------ add + RMSNorm
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (in x's dtype; ``s = x`` without a residual) and ``weight * RMSNorm(s)``.

    Args:
        x, residual: ``[..., D]`` contiguous, same shape and dtype (``residual`` may be None).
        weight: ``[D]`` (its dtype is the output's, as in ``LlamaRMSNorm``).
        eps: added to the mean square.
    Returns:
        ``(normed, s)``, both ``[..., D]``.
    """
    _check_rows("add_rms_norm", x, residual, weight)
    D = x.shape[-1]
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    if weight.shape != (D,):
        raise ValueError(f"add_rms_norm: weight must be [{D}], got {tuple(weight.shape)}")
    if resolve_backend(backend, x, residual, weight) == "torch":
        s = x if residual is None else x + residual
        h = s.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(s.dtype), s
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    s = x if residual is None else torch.empty_like(x)
    rows = x.numel() // D
    lazy_jit(_add_rms_norm_kernel)[(rows,)](
        x, x if residual is None else residual, weight, out, s, D, float(eps),
        HAS_RES=residual is not None, BLOCK=next_pow2(D))
    return out, s


def _add_rms_norm_kernel(X, R, W, OUT, S, D, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(X + row * D + offs, mask=ok, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + row * D + offs, mask=ok, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + row * D + offs, x, mask=ok)
    h = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h * h, 0) / D + eps)
    hn = (h * inv).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * D + offs, (w * hn).to(OUT.dtype.element_ty), mask=ok)


add_rms_norm_reference = torch_reference(add_rms_norm)


def is_rms_norm(module) -> bool:
    """Whether ``module`` is an RMSNorm :func:`add_rms_norm` computes (``LlamaRMSNorm``'s layout: a
    ``variance_epsilon`` and a ``[D]`` weight)."""
    weight = getattr(module, "weight", None)
    return hasattr(module, "variance_epsilon") and weight is not None and weight.dim() == 1


# ------------------------------------------------------------------------------------ rotary
def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q [B, H, S, Dh]`` and ``k [B, Hkv, S, Dh]`` with ``cos``/``sin``
    ``[B, S, Dh]`` (half-split rotation, ``rotate_half``); new tensors, inputs unchanged."""
    _check_rows("rope_qk", q, k, cos, sin)
    B, H, S, Dh = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (S, Dh) or k.dtype != q.dtype:
        raise ValueError(f"rope_qk: k must be [{B}, Hkv, {S}, {Dh}] {q.dtype}, got {tuple(k.shape)} {k.dtype}")
    if cos.dtype != q.dtype or sin.dtype != q.dtype:
        raise ValueError(f"rope_qk: cos and sin must have q's dtype {q.dtype} (transformers casts them), "
                         f"got {cos.dtype} / {sin.dtype}")
    if cos.shape != (B, S, Dh) or sin.shape != (B, S, Dh):
        raise ValueError(f"rope_qk: cos and sin must be [{B}, {S}, {Dh}], got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if Dh % 2:
        raise ValueError(f"rope_qk: the head dimension must be even, got {Dh}")
    if resolve_backend(backend, q, k, cos, sin) == "torch":
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)

        def rotate_half(x):
            return torch.cat((-x[..., Dh // 2:], x[..., : Dh // 2]), dim=-1)

        return (q * c) + (rotate_half(q) * s), (k * c) + (rotate_half(k) * s)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    Hkv = k.shape[1]
    lazy_jit(_rope_kernel)[(B * S, H + Hkv)](q, k, cos, sin, q_out, k_out, H, Hkv, S, Dh,
                                                   BLOCK=next_pow2(Dh // 2))
    return q_out, k_out


def _rope_kernel(Q, K, COS, SIN, QO, KO, H, Hkv, S, Dh, BLOCK: tl.constexpr):
    bs = tl.program_id(0).to(tl.int64)  # b * S + s
    head = tl.program_id(1)
    b = bs // S
    s = bs % S
    half = Dh // 2
    offs = tl.arange(0, BLOCK)
    ok = offs < half
    if head < H:  # one launch for both tensors: programs [0, H) rotate q, [H, H + Hkv) rotate k
        src = Q + ((b * H + head) * S + s) * Dh
        dst = QO + ((b * H + head) * S + s) * Dh
    else:
        src = K + ((b * Hkv + head - H) * S + s) * Dh
        dst = KO + ((b * Hkv + head - H) * S + s) * Dh
    rotate_half_rows(src + offs, dst + offs, COS + bs * Dh + offs, SIN + bs * Dh + offs, ok, ok, half,
                     Q.dtype.element_ty, True)


rope_qk_reference = torch_reference(rope_qk)


def rope_qk_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_buf: torch.Tensor, v_buf: torch.Tensor, slot: torch.Tensor, *,
                  backend: str = "auto") -> torch.Tensor:
    """A decode step's rotary embedding and KV write in one launch: ``q [B, 1, H*Dh]``, ``k``, ``v``
    ``[B, 1, Hkv*Dh]`` as the projections leave them (any row stride, e.g. the three parts of one
    merged q/k/v GEMM's output), ``cos``/``sin`` ``[B, 1, Dh]``; the rotated keys and the values are
    written into ``k_buf``/``v_buf`` ``[B, Hkv, L, Dh]`` at slot ``slot [1]`` (a device tensor, read
    by the kernel: CUDA-graph safe); returns the rotated queries ``[B, H, 1, Dh]``. What
    :func:`rope_qk` and ``StaticKV.update`` compute, without the three copies to contiguous heads
    and the two index copies (six launches a layer become one)."""
    B, S = q.shape[0], q.shape[1]
    _, Hkv, L, Dh = k_buf.shape
    H = q.shape[-1] // Dh if Dh else 0
    check_kernel_dtypes(same=False, q=q, k=k, v=v, cos=cos, sin=sin, k_buf=k_buf, v_buf=v_buf)
    if S != 1 or q.shape != (B, 1, H * Dh) or k.shape != (B, 1, Hkv * Dh) or v.shape != k.shape:
        raise ValueError(f"rope_qk_store: one decode token per row expected: q [{B}, 1, H*{Dh}], k and v "
                         f"[{B}, 1, {Hkv * Dh}]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if v_buf.shape != k_buf.shape or not (k_buf.is_contiguous() and v_buf.is_contiguous()):
        raise ValueError("rope_qk_store: k_buf and v_buf must be contiguous [B, Hkv, L, Dh] of one shape")
    if cos.shape != (B, 1, Dh) or sin.shape != (B, 1, Dh) or cos.dtype != q.dtype or sin.dtype != q.dtype:
        raise ValueError(f"rope_qk_store: cos and sin must be [{B}, 1, {Dh}] {q.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v)) or Dh % 2 or slot.numel() != 1:
        raise ValueError("rope_qk_store: rows of contiguous heads, an even head dim and one slot expected")
    if resolve_backend(backend, q, k, v, k_buf) == "torch":
        heads = lambda t, n: t.reshape(B, 1, n, Dh).transpose(1, 2).contiguous()  # noqa: E731
        q_rot, k_rot = rope_qk_reference(heads(q, H), heads(k, Hkv), cos.contiguous(), sin.contiguous())
        k_buf.index_copy_(2, slot, k_rot)
        v_buf.index_copy_(2, slot, heads(v, Hkv))
        return q_rot
    q_out = torch.empty((B, H, 1, Dh), dtype=q.dtype, device=q.device)
    lazy_jit(_rope_store_kernel)[(B, H + 2 * Hkv)](
        q, k, v, cos.contiguous(), sin.contiguous(), q_out, k_buf, v_buf, slot,
        q.stride(0), k.stride(0), v.stride(0), H, Hkv, L, Dh, BLOCK=next_pow2(Dh // 2))
    return q_out


def _rope_store_kernel(Q, K, V, COS, SIN, QO, KB, VB, SLOT, sq, sk, sv, H, Hkv, L, Dh, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)  # [0, H): rotate q head j; [H, H + Hkv): rotate k into the buffer; then copy v
    half = Dh // 2
    offs = tl.arange(0, BLOCK)
    ok = offs < half
    slot = tl.load(SLOT).to(tl.int64)
    if j < H:
        rotate_half_rows(Q + b * sq + j * Dh + offs, QO + (b * H + j) * Dh + offs, COS + b * Dh + offs,
                         SIN + b * Dh + offs, ok, ok, half, Q.dtype.element_ty, True)
    elif j < H + Hkv:
        h = j - H
        rotate_half_rows(K + b * sk + h * Dh + offs, KB + ((b * Hkv + h) * L + slot) * Dh + offs,
                         COS + b * Dh + offs, SIN + b * Dh + offs, ok, ok, half, Q.dtype.element_ty, True)
    else:
        h = j - H - Hkv
        row = V + b * sv + h * Dh
        dst = VB + ((b * Hkv + h) * L + slot) * Dh
        tl.store(dst + offs, tl.load(row + offs, mask=ok, other=0.0), mask=ok)
        tl.store(dst + half + offs, tl.load(row + half + offs, mask=ok, other=0.0), mask=ok)


rope_qk_store_reference = torch_reference(rope_qk_store)


# ------------------------------------------------------------------------------------ SwiGLU gate
def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` (``silu`` rounded to the input dtype first): ``[..., F]`` each, a
    contiguous ``[..., F]`` out. Rows may be strided (the two halves of one merged gate/up GEMM's
    output ``[..., 2F]``: :mod:`vtoken.engine.merged_projections`); each row's ``F`` values contiguous."""
    check_kernel_dtypes(same=False, **{"silu_mul gate": gate, "silu_mul up": up})
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must match")
    F_ = gate.shape[-1]
    g2, u2 = _rows(gate, F_), _rows(up, F_)
    if resolve_backend(backend, gate, up) == "torch":
        return torch.nn.functional.silu(gate) * up
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    lazy_jit(_silu_mul_kernel)[(g2.shape[0], -(-F_ // block))](g2, u2, out, F_, g2.stride(0), u2.stride(0), BLOCK=block)
    return out


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t [..., n]`` as ``[rows, n]`` rows with unit column stride (a view), else a clear error."""
    try:
        rows = t.view(-1, n)
    except RuntimeError:
        rows = None
    if rows is None or (n > 1 and rows.stride(1) != 1):
        raise ValueError(f"silu_mul: rows of contiguous values expected (shape {tuple(t.shape)}, strides {t.stride()})")
    return rows


def _silu_mul_kernel(G, U, OUT, n, stride_g, stride_u, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    g = tl.load(G + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * n + cols, (act * u).to(OUT.dtype.element_ty), mask=ok)


silu_mul_reference = torch_reference(silu_mul)
