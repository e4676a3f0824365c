"""Gather-attend: attention over the kept entries of a static KV buffer, read through index lists.

For pruned decode (and short prefill over a kept set): a few queries per sample attend to keys and
values read *through* per-sample (optionally per-KV-head) index lists into a preallocated KV buffer,
so no gathered copy is made and the buffer's shape never changes (CUDA graphs, ``torch.compile`` with
a static cache). Kept counts are ragged across the batch (``kept_len``).

Algorithm: split-K decoding in the manner of FlashDecoding (Dao, Haziza, Massa, Sizov, "Flash-Decoding
for long-context inference", 2023) on top of the FlashAttention online softmax (Dao et al., 2022):
the kept list is cut into ``S`` chunks; one program per (chunk, sample, KV head) computes a partial,
unnormalised output with its running max and sum for all ``G x Q`` query rows that share the KV head
(the GQA group is packed into the rows of one tile, so every K/V row is read once per KV head); a
second kernel merges the ``S`` partials with their log-sum-exp weights. With one chunk the first
kernel writes the normalised output directly. ``S`` depends only on static shapes (K, B, Hkv and the
SM count), never on data, and nothing syncs with the host.

Shapes: q ``[B, H, Q, D]``; k_buf, v_buf ``[B, Hkv, L, D]``; kept_idx ``[B, K]`` or ``[B, Hkv, K]``
(int32/int64, indices into L); kept_len ``[B]``. Sample ``b`` attends to
``kept_idx[b, ..., :kept_len[b]]``; query ``i`` is kept entry ``kept_len - Q + i`` and sees entries
``t <= kept_len - Q + i`` (causal within the kept list; ``kept_len`` above K counts as K, indices are
clamped into ``[0, L)``). Output ``[B, H, Q, D]`` in q's dtype.

``return_row=True`` also gives the last query's attention row over the kept list (the signal a
decode-time score accumulates), as :func:`vtoken.kernels.attend_and_score` gives its rows: the first
kernel stores the row's logits as it computes them, the split kernel (one split) or the merge kernel
its log-sum-exp, and ``p = exp2(s - lse)`` normalises them; no second pass over the keys.
"""

import functools
from typing import NamedTuple

import torch

from vtoken.kernels.checks import check_gather_args, check_kernel_dtypes, index_tensor, softmax_scale
from vtoken.kernels.dispatch import cdiv, device_sms, interpreter_enabled, lazy_jit, next_pow2, resolve_backend
from vtoken.kernels.dispatch import tl, torch_reference
from vtoken.kernels.reference import gather_attend_torch
from vtoken.kernels.triton_helpers import LOG2E, attend_block, dot_qk, normalize_rows


def gather_attend(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    kept_idx: torch.Tensor,
    kept_len: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    return_row: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``Q`` queries per sample over kept KV-buffer entries, without gathering them.

    Args:
        q: ``[B, H, Q, D]`` queries (Q small: 1 for decode, up to a few dozen).
        k_buf, v_buf: ``[B, Hkv, L, D]`` static KV buffer; query head ``h`` reads KV head
            ``h // (H // Hkv)``.
        kept_idx: ``[B, K]`` (shared by all KV heads) or ``[B, Hkv, K]`` int32/int64 indices into the
            buffer's L axis, in causal order. Entries at or past ``kept_len[b]`` are ignored.
        kept_len: ``[B]`` integer count of valid entries per sample (a device tensor; no host sync).
        scale: softmax scale, default ``1/sqrt(D)``.
        num_splits: chunks of the key axis (split-K); default picks one from the static shapes.
        return_row: also return the attention row of the last query (what a score accumulated over
            decode steps reads), from the logits and log-sum-exp the attention computes anyway.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        ``[B, H, Q, D]``; a query that sees no kept entry gets zeros. With ``return_row``:
        ``(out, row)``, row ``[B, H, K]`` float32 the last query's softmax probabilities over the
        kept list, per head (0 past ``kept_len``; all 0 where it sees nothing).

    CUDA graphs: the Triton path reads only shapes, strides and dtypes on the host (no sync, no
    data-dependent branch, allocations of static size), so a captured call replays correctly after
    ``kept_idx`` / ``kept_len`` (and q, the buffers) are changed in place. Make one call outside the
    capture first, with the same tensors: it compiles the kernels (Triton specialises on argument
    alignment, so a warm-up on other tensors may not be enough).
    """
    B, H, Hkv, Q, D, L, K = check_gather_args(q, k_buf, v_buf, kept_idx, kept_len)
    scale = softmax_scale(scale, D)
    if resolve_backend(backend, q, k_buf, v_buf, kept_idx, kept_len) == "torch":
        return gather_attend_torch(q, k_buf, v_buf, kept_idx, kept_len, scale, return_row)
    check_kernel_dtypes(q=q, k_buf=k_buf, v_buf=v_buf)
    return _gather_attend_triton(q, k_buf, v_buf, kept_idx, kept_len, scale, num_splits, return_row)


gather_attend_reference = torch_reference(gather_attend, "num_splits")


def _split_kernel(
    Q, KB, VB, IDX, KLEN, O, PACC, PML, ROW, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sib, sih, sik,
    sob, soh, son, sod,
    Hkv, G, QL, M_TOT, K_MAX, L_BUF, chunk, qk_scale,
    NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, WANT_ROW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bk = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (pid_bk // Hkv).to(tl.int64)
    kvh = (pid_bk % Hkv).to(tl.int64)

    # Tile rows: row r = g * QL + i  (query head kvh * G + g, query i).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M_TOT
    g = offs_m // QL
    qi = offs_m % QL
    h = kvh * G + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h[:, None] * sqh + qi[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    klen = tl.minimum(tl.load(KLEN + b).to(tl.int32), K_MAX)
    limit = klen - QL + qi  # last kept position each row may see
    start = pid_s * chunk
    end = tl.minimum(start + chunk, klen)

    idx_base = IDX + b * sib + kvh * sih
    k_base = KB + b * skb + kvh * skh
    v_base = VB + b * svb + kvh * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        idx = tl.load(idx_base + offs_n * sik, mask=n_ok, other=0).to(tl.int64)
        idx = tl.minimum(tl.maximum(idx, 0), L_BUF - 1)  # never read outside the buffer
        k = tl.load(k_base + idx[:, None] * skl + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = dot_qk(q, k, IEEE)
        see = n_ok[None, :] & (offs_n[None, :] <= limit[:, None])
        s = tl.where(see, s * qk_scale, float("-inf"))
        if WANT_ROW:  # the last query's logits (log2 units); normalised on the host with its LSE
            row_ok = (m_ok & (qi == QL - 1))[:, None] & n_ok[None, :]
            tl.store(ROW + (b * Hkv * G + h[:, None]) * K_MAX + offs_n[None, :], s, mask=row_ok)
        m_i, l_i, acc = attend_block(m_i, l_i, acc, s, v_base, idx, svl, offs_d, svd,
                                     n_ok[:, None] & d_ok[None, :], IEEE)

    if NUM_SPLITS == 1:
        if WANT_ROW:  # log-sum-exp of the last query's row (log2 units; l_i >= 1 once it saw a key)
            tl.store(LSE + b * Hkv * G + h, m_i + tl.log2(tl.maximum(l_i, 1e-30)), mask=m_ok & (qi == QL - 1))
        out = normalize_rows(acc, l_i)
        o_ptrs = O + b * sob + h[:, None] * soh + qi[:, None] * son + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    else:
        # Partials: PACC [B*Hkv, S, M_TOT, BLOCK_D], PML [B*Hkv, S, 2, M_TOT] (max, sum; log2 units).
        part = pid_bk.to(tl.int64) * NUM_SPLITS + pid_s
        a_ptrs = PACC + (part * M_TOT + offs_m[:, None]) * BLOCK_D + offs_d[None, :]
        tl.store(a_ptrs, acc, mask=m_ok[:, None])
        tl.store(PML + (part * 2) * M_TOT + offs_m, m_i, mask=m_ok)
        tl.store(PML + (part * 2 + 1) * M_TOT + offs_m, l_i, mask=m_ok)


def _merge_kernel(
    PACC, PML, O, LSE,
    sob, soh, son, sod,
    H, Hkv, G, QL, M_TOT,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, WANT_ROW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # one output row (b, h, i)
    i = pid % QL
    h = (pid // QL) % H
    b = (pid // (QL * H)).to(tl.int64)
    kvh = h // G
    r = (h % G) * QL + i
    bk = b * Hkv + kvh

    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < NUM_SPLITS
    part = bk * NUM_SPLITS + offs_s
    m = tl.load(PML + (part * 2) * M_TOT + r, mask=s_ok, other=float("-inf"))
    l = tl.load(PML + (part * 2 + 1) * M_TOT + r, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe)  # 0 for empty splits
    denom = tl.sum(w * l, 0)
    if WANT_ROW:
        tl.store(LSE + b * H + h, m_safe + tl.log2(tl.maximum(denom, 1e-30)), mask=i == QL - 1)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.load(PACC + (part[:, None] * M_TOT + r) * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + b * sob + h * soh + i * son + offs_d * sod, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


class _LaunchPlan(NamedTuple):
    block_m: int
    block_n: int
    block_d: int
    m_blocks: int
    num_splits: int
    chunk: int  # kept entries per split, a multiple of block_n


@functools.lru_cache(maxsize=4096)
def _launch_plan(B, Hkv, M_TOT, D, K, num_splits, sms, interp, block_n=None) -> _LaunchPlan:
    """Tiles, split count and chunk length, from static shapes (and the SM count) alone (cached).

    ``kept_len`` and ``kept_idx`` contents never enter (they are read on the device only), which is
    what makes :func:`gather_attend` CUDA-graph safe: one capture replays for any kept lists and
    counts. ``num_splits`` None: enough chunks of the key axis for about two waves of programs, at
    least 2 key tiles each (a shorter chunk costs more in its merge than it saves), at most 128.
    """
    block_m = min(64, max(16, next_pow2(M_TOT)))
    m_blocks = cdiv(M_TOT, block_m)
    block_n = block_n or (16 if interp else 64)
    if num_splits is None:
        want = max(1, cdiv(2 * sms, B * Hkv * m_blocks))
        num_splits = max(1, min(want, max(1, cdiv(K, block_n)) // 2, 128))
    num_splits = max(1, min(num_splits, max(1, cdiv(K, block_n))))
    chunk = cdiv(cdiv(max(K, 1), num_splits), block_n) * block_n
    num_splits = max(1, cdiv(max(K, 1), chunk))
    return _LaunchPlan(block_m, block_n, max(16, next_pow2(D)), m_blocks, num_splits, chunk)


class _Launch(NamedTuple):
    """Static shapes of a gather-attend launch: G query heads per KV head, ``M_TOT = G * Q`` tile
    rows per (sample, KV head); ``interp``: running in Triton's interpreter."""

    B: int
    H: int
    Hkv: int
    G: int
    Q: int
    D: int
    K: int
    M_TOT: int
    interp: bool


def _launch_shapes(q, k_buf, kept_idx) -> tuple:
    """(:class:`_Launch`, the output ``[B, H, Q, D]`` to fill, whether there is nothing to compute).
    Shapes only: no host sync, a static-size allocation."""
    B, H, Q, D = q.shape
    Hkv = k_buf.shape[1]
    out = torch.empty((B, H, Q, D), dtype=q.dtype, device=q.device)
    shapes = _Launch(B, H, Hkv, H // max(Hkv, 1), Q, D, kept_idx.shape[-1], (H // max(Hkv, 1)) * Q,
                     interpreter_enabled() and not q.is_cuda)
    return shapes, out, B == 0 or H == 0 or Q == 0


def _gather_attend_triton(q, k_buf, v_buf, kept_idx, kept_len, scale, num_splits, return_row=False, tiles=None):
    """``tiles``: ``(block_n, num_warps, num_stages)`` of the split kernel instead of the defaults
    (``benchmarks/profile/decode_kernels.py`` sweeps them)."""
    # Host side: shapes, strides and dtypes only; every allocation has a static size; no host sync.
    (B, H, Hkv, G, Q, D, K, M_TOT, interp), out, empty = _launch_shapes(q, k_buf, kept_idx)
    row = lse = out  # unused without return_row
    if return_row:
        row = torch.full((B, H, K), float("-inf"), dtype=torch.float32, device=q.device)
        lse = torch.full((B, H), float("-inf"), dtype=torch.float32, device=q.device)
    if empty:
        return (out, row.nan_to_num_(0.0, neginf=0.0)) if return_row else out
    splits = None if num_splits is None else int(num_splits)
    block_n, warps, stages = tiles or (None, 4, 3 if not interp else 1)
    plan = _launch_plan(B, Hkv, M_TOT, D, K, splits, device_sms(q), interp, block_n)
    BLOCK_D, S = plan.block_d, plan.num_splits

    if kept_idx.dim() == 2:
        sib, sik = kept_idx.stride()
        sih = 0
    else:
        sib, sih, sik = kept_idx.stride()
    klen = index_tensor(kept_len, q.device)
    if S > 1:
        pacc = torch.empty((B * Hkv, S, M_TOT, BLOCK_D), dtype=torch.float32, device=q.device)
        pml = torch.empty((B * Hkv, S, 2, M_TOT), dtype=torch.float32, device=q.device)
    else:
        pacc = pml = out  # unused
    lazy_jit(_split_kernel)[(S, B * Hkv, plan.m_blocks)](
        q, k_buf, v_buf, kept_idx, klen, out, pacc, pml, row, lse,
        *q.stride(), *k_buf.stride(), *v_buf.stride(),
        sib, sih, sik,
        *out.stride(),
        Hkv, G, Q, M_TOT, K, k_buf.shape[2], plan.chunk, scale * LOG2E,
        NUM_SPLITS=S, IEEE=q.dtype == torch.float32, WANT_ROW=return_row,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        num_warps=warps, num_stages=stages,
    )
    if S > 1:
        lazy_jit(_merge_kernel)[(B * H * Q,)](
            pacc, pml, out, lse,
            *out.stride(),
            H, Hkv, G, Q, M_TOT,
            NUM_SPLITS=S, SPLITS_P2=next_pow2(S), WANT_ROW=return_row,
            HEAD_DIM=D, BLOCK_D=BLOCK_D,
            num_warps=4 if BLOCK_D * next_pow2(S) >= 4096 else 2,
        )
    if return_row:  # p = exp2(s - lse); a row that saw nothing (lse = -inf) is 0, not NaN
        return out, torch.exp2(row - lse[..., None]).nan_to_num_(0.0)
    return out
