"""Skinny linear: ``y = x @ W^T (+ b)`` for one row of ``x`` (a batch-1 decode step), weight-read bound.

At batch 1 every projection of a decode step is a matrix-vector product: the step reads each weight
once and does two FLOPs per weight element, so its time is the weight bytes over the memory bandwidth
(LLaVA-1.5-7B: 13.2 GB, 4.0 ms at an H100's 3.35 TB/s). cuBLAS serves ``M = 1`` with GEMM tiles of
8 rows (``nvjet_..._64x8``), some split along K with a separate reduction kernel; session 19's H100
profile measured its four per-layer products at 2.56-2.95 TB/s (``benchmarks/e2e/profile_ttft_h100_s19``).

This kernel is the textbook GEMV (Williams et al., "Optimization of sparse matrix-vector multiplication
on emerging multicore platforms", 2007, for the streaming structure; any BLAS ``gemv``): one program
per ``BLOCK_N`` output features streams its ``[BLOCK_N, K]`` slab of W in ``[BLOCK_N, BLOCK_K]``
tiles, multiplies each by the matching slice of ``x`` and keeps a float32 ``[BLOCK_N, BLOCK_K]``
partial that is reduced along K once, at the end (no per-tile cross-thread reduction). No split-K,
no second kernel, no host sync: CUDA-graph safe once a first call of the weight's shape has run
outside the capture (it compiles and, unless ``tiles`` are given, autotunes).

Shapes: x ``[..., K]`` whose leading dims multiply to 1; weight ``[N, K]`` with unit stride along K
(a row stride above K is fine: the merged-projection buffers' views); bias ``[N]`` or None. Returns
``[..., N]`` in x's dtype, accumulated in float32 (as cuBLAS accumulates bf16 products).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtoken.kernels.dispatch import cdiv, kernel_launcher, resolve_backend, tl, torch_reference

#: (BLOCK_N, BLOCK_K, num_warps, num_stages) without autotuning (``VTOKEN_KERNELS_AUTOTUNE=0``)
DEFAULT_TILES = (16, 256, 4, 3)
#: what the first call of each weight shape (N, K) on a GPU times (Triton's autotuner; a CUDA graph's
#: warm-up call does it before the capture), unless the caller names its tiles. One BLOCK_K for all:
#: the tile along K sets the order of the float32 sums, and the result must not depend on the timing
TUNING_TILES = ((4, 256, 4, 3), (8, 256, 4, 3), (16, 256, 4, 3), (16, 256, 8, 3), (32, 256, 8, 3),
                (8, 256, 4, 4), (16, 256, 4, 4), (16, 256, 8, 2))
#: small tiles for Triton's CPU interpreter
INTERPRETER_TILES = (8, 32, 1, 1)
_launchers: dict = {}  # mode -> kernel (see dispatch.kernel_launcher)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, tiles: tuple | None = None,
         backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a single row of ``x`` (see the module docstring).

    Args:
        x: ``[..., K]``, one row in all (``x.numel() == K``).
        weight: ``[N, K]``, ``weight.stride(1) == 1``.
        bias: ``[N]`` or None.
        tiles: ``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` for the Triton kernel; default: autotuned
            per weight shape over :data:`TUNING_TILES` on a GPU (its first call times them),
            :data:`DEFAULT_TILES` with ``VTOKEN_KERNELS_AUTOTUNE=0``, small tiles in the interpreter.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.
    """
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"gemv: x [..., {x.shape[-1]}] does not match weight {tuple(weight.shape)} ([N, K])")
    if x.numel() != x.shape[-1] or x.numel() == 0:
        raise ValueError(f"gemv reads one row of x; got x of shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    if resolve_backend(backend, x, weight, bias) == "torch":
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    if weight.stride(1) != 1:
        raise ValueError("gemv's Triton kernel needs weight.stride(1) == 1 (rows contiguous along K)")
    N, K = weight.shape
    xv = x.reshape(K)
    if xv.stride(0) != 1:
        xv = xv.contiguous()
    out = torch.empty(N, dtype=x.dtype, device=x.device)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    args = (xv, weight, bias if bias is not None else out, out, N, K, weight.stride(0))
    mode, kernel = kernel_launcher(_launchers, _gemv_kernel, TUNING_TILES, ["N", "K"], tune=tiles is None,
                                   tile_names=("BLOCK_N", "BLOCK_K"))
    if mode == "tuned":
        kernel[lambda meta: (cdiv(N, meta["BLOCK_N"]),)](*args, HAS_BIAS=bias is not None)
    else:
        block_n, block_k, warps, stages = tiles or (INTERPRETER_TILES if mode == "interp" else DEFAULT_TILES)
        kernel[(cdiv(N, block_n),)](*args, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                    num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], N)


gemv_reference = torch_reference(gemv, "tiles")


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through :func:`gemv` where ``x`` is one row and the backend
    resolves to Triton (a batch-1 decode step on CUDA); ``F.linear`` otherwise: more rows, float64,
    mixed dtypes, tensor subclasses (quantized weights: the kernel reads plain storage only), and the
    ``"torch"`` backend (which computes exactly what the model's own ``nn.Linear`` computes)."""
    one_row = x.numel() == x.shape[-1] > 0 and weight.dim() == 2 and weight.stride(1) == 1
    floats = (torch.bfloat16, torch.float16, torch.float32)
    plain = all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in (x, weight, bias) if t is not None)
    if (one_row and plain and x.dtype in floats and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
            and resolve_backend(backend, x, weight, bias) == "triton"):
        return gemv(x, weight, bias, backend="triton")
    return F.linear(x, weight, bias)


def _gemv_kernel(X, W, B, Y, N, K, swn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = W + offs_n.to(tl.int64)[:, None] * swn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=n_ok)
