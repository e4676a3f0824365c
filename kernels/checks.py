"""Argument checks and normalisation shared by vtoken's kernel entry points.

Each public kernel function (:func:`~vtoken.kernels.attend_and_score`,
:func:`~vtoken.kernels.gather_attend`, :func:`~vtoken.kernels.varlen_attention`) checks its arguments
here once, before choosing a backend, so the Triton kernels and the PyTorch references see the same
validated arguments and raise the same errors. The dtype rule (:func:`check_kernel_dtypes`) is the
Triton kernels' own and is applied only where Triton runs.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


class Verdicts(dict):
    """Decisions taken once per key and then kept (key -> bool): whether a faster kernel computes what
    its reference computes, judged on the first call's own inputs for that key (device, dtype,
    shape class, what is replaced). Used by :func:`~vtoken.kernels.varlen.long_segment_attention`
    (cuDNN against a float32 softmax) and the vision tower's fused kernels
    (:mod:`vtoken.kernels.vision_patch`)."""

    def decide(self, key: Hashable, judge: Callable[[], bool]) -> bool:
        """The kept verdict for ``key``; ``judge()`` is called only when there is none yet."""
        if key not in self:
            self[key] = bool(judge())
        return self[key]


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale as a float: ``scale``, or ``1/sqrt(head_dim)`` when it is None."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def check_kernel_dtypes(same: bool = True, **tensors: torch.Tensor) -> None:
    """Every tensor is float16, bfloat16 or float32 (what the Triton kernels compute in) and, with
    ``same``, all share one dtype."""
    dtypes = [t.dtype for t in tensors.values()]
    for name, dtype in zip(tensors, dtypes):
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {dtype}")
    if same and dtypes.count(dtypes[0]) != len(dtypes):
        raise TypeError(f"{', '.join(tensors)} must share a dtype; got {', '.join(map(str, dtypes))}")


def index_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` as int32 or int64 (other integer dtypes become int64); no copy when it already is."""
    t = t.to(device=device)
    return t if t.dtype in INDEX_DTYPES else t.long()


def check_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate ``q [B, H, N, D]``, ``k/v [B, Hkv, N, D]``; return ``(B, H, Hkv, N, D)``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, N, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != N or k.shape[3] != D:
        raise ValueError(f"k and v must be [B={B}, Hkv, N={N}, D={D}]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={Hkv}")
    return B, H, Hkv, N, D


def check_attend_and_score_args(q, k, v, score_rows, key_start, key_end, key_padding_mask):
    """Validate :func:`~vtoken.kernels.attend_and_score`'s arguments.

    Returns ``(B, H, Hkv, N, D, key_start, key_end)`` with the key range as ints (``key_end`` None -> N).
    """
    B, H, Hkv, N, D = check_attention_shapes(q, k, v)
    key_end = N if key_end is None else int(key_end)
    key_start = int(key_start)
    if not 0 <= key_start <= key_end <= N:
        raise ValueError(f"need 0 <= key_start <= key_end <= N={N}; got key_start={key_start}, key_end={key_end}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask must be [B={B}, N={N}], got {tuple(key_padding_mask.shape)}")
    if score_rows is not None and (score_rows.dim() != 2 or score_rows.shape[0] != B):
        raise ValueError(f"score_rows must be [B={B}, R], got {tuple(score_rows.shape)}")
    return B, H, Hkv, N, D, key_start, key_end


def check_gather_args(q, k_buf, v_buf, kept_idx, kept_len):
    """Validate :func:`~vtoken.kernels.gather_attend`'s tensors; return ``(B, H, Hkv, Q, D, L, K)``.

    Reads shapes and dtypes only, never tensor data (no host sync: safe inside CUDA-graph capture).
    """
    if q.dim() != 4 or k_buf.dim() != 4 or k_buf.shape != v_buf.shape:
        raise ValueError(
            f"q must be [B, H, Q, D] and k_buf, v_buf the same [B, Hkv, L, D]; got q {tuple(q.shape)}, "
            f"k_buf {tuple(k_buf.shape)}, v_buf {tuple(v_buf.shape)}"
        )
    B, H, Q, D = q.shape
    Hkv, L = k_buf.shape[1], k_buf.shape[2]
    if k_buf.shape[0] != B or k_buf.shape[3] != D:
        raise ValueError(f"k_buf must be [B={B}, Hkv, L, D={D}], got {tuple(k_buf.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={Hkv}")
    if kept_idx.dim() not in (2, 3) or kept_idx.shape[0] != B or (kept_idx.dim() == 3 and kept_idx.shape[1] != Hkv):
        raise ValueError(f"kept_idx must be [B={B}, K] or [B, Hkv={Hkv}, K], got {tuple(kept_idx.shape)}")
    if kept_idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"kept_idx must be int32 or int64, got {kept_idx.dtype}")
    if kept_len.shape != (B,):
        raise ValueError(f"kept_len must be [B={B}], got {tuple(kept_len.shape)}")
    return B, H, Hkv, Q, D, L, kept_idx.shape[-1]


def check_varlen_args(q, k, v, cu_seqlens):
    """Validate :func:`~vtoken.kernels.varlen_attention`'s tensors; return ``(Total, H, D)``."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must be the same [Total, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [S+1], got {tuple(cu_seqlens.shape)}")
    return q.shape
