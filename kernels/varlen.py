"""Variable-length block-diagonal attention: every packed segment attends only within itself.

For vision towers that split attention into windows or per-image/per-frame segments (Qwen2-VL,
Qwen2.5-VL, ...). On ``transformers``' SDPA path such a tower runs one attention call per window,
about a thousand launches per layer at 16K patches; this kernel does the whole layer in one launch.
Used over the kept patches only, it also serves plans that prune inside the vision tower: pack the
kept tokens and pass their ``cu_seqlens``.

Algorithm: the non-causal FlashAttention forward (Dao et al., "FlashAttention", NeurIPS 2022;
"FlashAttention-2", 2023, whose varlen API introduced ``cu_seqlens``) with one program per
(query tile, segment, head); a program streams only its own segment's key tiles.

Shapes: q, k, v ``[Total, H, D]`` (any float dtype of fp16/bf16/fp32, any strides); cu_seqlens
``[S+1]`` int32/int64 with ``cu_seqlens[0] = 0`` and ``cu_seqlens[S] = Total``. Output ``[Total, H, D]``.
"""

import torch

from vtoken.kernels.checks import Verdicts, check_kernel_dtypes, check_varlen_args, index_tensor, softmax_scale
from vtoken.kernels.dispatch import (cdiv, is_device_failure, kernel_launcher, next_pow2, resolve_backend, tl,
                                     torch_reference)
from vtoken.kernels.reference import varlen_attention_torch
from vtoken.kernels.triton_helpers import LOG2E, accumulate_pv, dot_qk, softmax_step


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-diagonal attention over packed segments, one kernel launch.

    Args:
        q, k, v: ``[Total, H, D]``.
        cu_seqlens: ``[S+1]`` cumulative segment boundaries.
        scale: softmax scale, default ``1/sqrt(D)``.
        max_seqlen: longest segment, if the caller knows it (saves one device-to-host read).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        ``[Total, H, D]`` in q's dtype.
    """
    T, H, D = check_varlen_args(q, k, v, cu_seqlens)
    scale = softmax_scale(scale, D)
    if resolve_backend(backend, q, k, v, cu_seqlens) == "torch":
        return varlen_attention_torch(q, k, v, cu_seqlens, scale)
    check_kernel_dtypes(same=False, q=q, k=k, v=v)  # (as before: no same-dtype rule here)
    return _varlen_triton(q, k, v, cu_seqlens, scale, max_seqlen)


varlen_attention_reference = torch_reference(varlen_attention, "max_seqlen")

#: segments at least this long (every one of a call's) go to cuDNN's fused attention where it runs
#: (:func:`long_segment_attention`)
LONG_SEGMENT = 4096
#: per (device, dtype, head dim, each segment length modulo 128): whether cuDNN's output agreed with
#: the reference on the first call's probe rows (False: refused, or disagreed: varlen runs there)
_CUDNN_VERDICTS = Verdicts()
_PROBE_ROWS = 8


def _probe_agrees(q, k, v, out, bounds, scale) -> bool:
    """The first ``_PROBE_ROWS`` query rows of each segment against a float32 softmax over that
    segment's keys (every key: a small ``[H, rows, n]`` score matrix). An output row is a convex
    combination of the segment's value rows, so rounding the probabilities and the output to the
    half-precision dtype moves it by a few steps of that dtype times the largest value entry;
    the bound is 4 such steps per head (a layout or stride mistake misses by the values' size)."""
    scale = softmax_scale(scale, q.shape[-1])
    for a, b in zip(bounds[:-1], bounds[1:]):
        r = min(_PROBE_ROWS, b - a)
        if r <= 0:
            continue
        qs, ks, vs = (t.float().transpose(0, 1) for t in (q[a:a + r], k[a:b], v[a:b]))  # [H, ., D]
        want = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1) @ vs  # [H, r, D]
        got = out[a:a + r].float().transpose(0, 1)
        tol = 4 * torch.finfo(q.dtype).eps * vs.abs().amax(dim=(1, 2)).view(-1, 1, 1) + 1e-6
        if not bool(((got - want).abs() <= tol).all()):
            return False
    return True


def is_capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``t``'s device (False off CUDA,
    where asking would raise on a CPU-only torch)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _cuda_runtime_at_least(major: int, minor: int) -> bool:
    try:
        have = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    except ValueError:
        return False
    return have >= (major, minor)


def long_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple,
                           scale: float | None = None) -> torch.Tensor | None:
    """Block-diagonal attention over long segments as one cuDNN fused-attention call per segment
    (PyTorch's ``scaled_dot_product_attention`` with only ``SDPBackend.CUDNN_ATTENTION`` allowed),
    or None where that kernel is not to run: not CUDA, not fp16 / bf16, gradients needed, cuDNN's
    SDPA turned off (``torch.backends.cuda.enable_cudnn_sdp(False)``), a CUDA runtime before 12.9
    (where PyTorch itself leaves cuDNN's SDPA off by default), a CUDA graph being captured
    (the segment boundaries are read on the host), or a (device, dtype, head dim, length modulo 128)
    where cuDNN refused the call or its first output disagreed with a float32 reference on a few
    query rows (:func:`_probe_agrees`; decided once, then kept). The caller then runs
    :func:`varlen_attention`. Out of memory and CUDA errors are raised, not taken for a refusal.
    (``sdpa_kernel`` sets PyTorch's backend flags for the process while the call runs.)

    Why: a Qwen2.5-VL tower's full-attention blocks attend over a whole image, one segment of up to
    65,536 patches with 16 heads of dim 80. There :func:`varlen_attention` (head dim 80 as a 64- and
    a 16-wide slice) reaches 303 TFLOP/s on an H100 and cuDNN's kernel 417 (72.6 vs 52.7 ms a call;
    ``benchmarks/profile/long_attention.py``); on 64-patch windows the two are even (0.41 / 0.39 ms).

    Args:
        q, k, v: ``[Total, H, D]``; bounds: the host copy of ``cu_seqlens`` (``S + 1`` ints).
    Returns:
        ``[Total, H, D]``, or None.
    """
    if (not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
            or not torch.backends.cuda.cudnn_sdp_enabled() or is_capturing(q)
            or not _cuda_runtime_at_least(12, 9)):  # PyTorch's own gate for cuDNN SDPA (pytorch#171627)
        return None
    key = (q.device, q.dtype, q.shape[-1], tuple(sorted({(b - a) % 128 for a, b in zip(bounds[:-1], bounds[1:])})))
    if _CUDNN_VERDICTS.get(key) is False:
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = varlen_attention_torch(q, k, v, bounds, scale)
    except RuntimeError as exc:
        if is_device_failure(exc):
            raise
        _CUDNN_VERDICTS[key] = False  # no cuDNN attention in this build, or not for this shape / dtype
        return None
    return out if _CUDNN_VERDICTS.decide(key, lambda: _probe_agrees(q, k, v, out, bounds, scale)) else None


def _varlen_kernel(
    Q, K, V, O, CU,
    sqt, sqh, sqd,
    skt, skh, skd,
    svt, svh, svd,
    sot, soh, sod,
    qk_scale, MAXLEN_BUCKET,
    IEEE: tl.constexpr, HEAD_DIM: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The head dim is covered by two power-of-two slices, [0, D1) and [D1, D1 + D2) (D2 = 0: none),
    # so D = 80 costs 64 + 16 columns of tensor-core work instead of a padded 128.
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    seg_start = tl.load(CU + seg).to(tl.int64)
    seg_end = tl.load(CU + seg + 1).to(tl.int64)
    q_start = seg_start + pid_m * BLOCK_M
    # Tiles past the segment's end run an empty loop and store nothing.
    kv_end = tl.where(q_start < seg_end, seg_end, seg_start)

    offs_m = q_start + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seg_end
    offs_d1 = tl.arange(0, D1)
    d1_ok = offs_d1 < HEAD_DIM
    q1 = tl.load(Q + offs_m[:, None] * sqt + h * sqh + offs_d1[None, :] * sqd,
                 mask=m_ok[:, None] & d1_ok[None, :], other=0.0)
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2)
        d2_ok = offs_d2 < HEAD_DIM
        q2 = tl.load(Q + offs_m[:, None] * sqt + h * sqh + offs_d2[None, :] * sqd,
                     mask=m_ok[:, None] & d2_ok[None, :], other=0.0)
        acc2 = tl.zeros([BLOCK_M, D2], tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
    for start_n in range(seg_start, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seg_end
        k1 = tl.load(K + offs_n[:, None] * skt + h * skh + offs_d1[None, :] * skd,
                     mask=n_ok[:, None] & d1_ok[None, :], other=0.0)
        s = dot_qk(q1, k1, IEEE)
        if D2 > 0:
            k2 = tl.load(K + offs_n[:, None] * skt + h * skh + offs_d2[None, :] * skd,
                         mask=n_ok[:, None] & d2_ok[None, :], other=0.0)
            s += dot_qk(q2, k2, IEEE)
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        m_new, alpha, p, l_i = softmax_step(m_i, l_i, s)
        v1 = tl.load(V + offs_n[:, None] * svt + h * svh + offs_d1[None, :] * svd,
                     mask=n_ok[:, None] & d1_ok[None, :], other=0.0)
        acc1 = accumulate_pv(acc1, alpha, p, v1, IEEE)
        if D2 > 0:
            v2 = tl.load(V + offs_n[:, None] * svt + h * svh + offs_d2[None, :] * svd,
                         mask=n_ok[:, None] & d2_ok[None, :], other=0.0)
            acc2 = accumulate_pv(acc2, alpha, p, v2, IEEE)
        m_i = m_new

    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    o_row = O + offs_m[:, None] * sot + h * soh
    tl.store(o_row + offs_d1[None, :] * sod, (acc1 * inv_l[:, None]).to(O.dtype.element_ty),
             mask=m_ok[:, None] & d1_ok[None, :])
    if D2 > 0:
        tl.store(o_row + offs_d2[None, :] * sod, (acc2 * inv_l[:, None]).to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d2_ok[None, :])


def split_head_dim(D: int) -> tuple[int, int]:
    """Two power-of-two slices (each >= 16, the smallest dot size) covering a head dim D: 80 -> (64, 16)."""
    if D <= 16:
        return 16, 0
    d1 = 1 << (D.bit_length() - 1)  # largest power of two <= D
    rest = D - d1
    return (d1, 0) if rest == 0 else (d1, max(16, next_pow2(rest)))


# Long segments (full-attention layers): autotuned among these (sm_90 builds, D = 80: none spills).
_LONG_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
_launchers: dict = {}  # mode -> kernel (see dispatch.kernel_launcher)


def _varlen_triton(q, k, v, cu_seqlens, scale, max_seqlen):
    T, H, D = q.shape
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    S = cu_seqlens.numel() - 1
    if T == 0 or S <= 0 or H == 0:
        return out.zero_() if T else out
    cu = index_tensor(cu_seqlens, q.device).contiguous()
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max().item())  # one host read per call
    max_seqlen = int(max_seqlen)
    if max_seqlen <= 0:
        return out.zero_()
    D1, D2 = split_head_dim(D)
    mode, kernel = kernel_launcher(_launchers, _varlen_kernel, _LONG_CONFIGS, ["MAXLEN_BUCKET", "HEAD_DIM", "IEEE"],
                                   tune=max_seqlen > 256)
    args = (q, k, v, out, cu, *q.stride(), *k.stride(), *v.stride(), *out.stride(), scale * LOG2E,
            next_pow2(max_seqlen))
    meta = dict(IEEE=q.dtype == torch.float32, HEAD_DIM=D, D1=D1, D2=D2)
    if mode == "tuned":
        grid = lambda m: (cdiv(max_seqlen, m["BLOCK_M"]), S, H)  # noqa: E731
        kernel[grid](*args, **meta)
        return out
    if mode == "interp":
        BM, BN, warps, stages = 16, 16, 4, 1
    elif max_seqlen <= 64:
        BM, BN, warps, stages = 64, 64, 4, 2
    elif max_seqlen <= 256 or q.dtype == torch.float32:
        BM, BN, warps, stages = 64, 64, 4, 3 if q.dtype != torch.float32 else 2
    else:
        BM, BN, warps, stages = 128, 64, 8, 3
    kernel[(cdiv(max_seqlen, BM), S, H)](*args, **meta, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps,
                                                 num_stages=stages)
    return out
