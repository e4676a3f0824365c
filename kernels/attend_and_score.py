"""Fused attend-and-score: causal FlashAttention forward + exact attention probabilities of chosen rows.

Algorithm. Pass 1 is a FlashAttention-style causal forward (Dao et al., "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", NeurIPS 2022; "FlashAttention-2", 2023): each
program owns a tile of query rows of one head, streams key/value tiles through an online softmax and
writes the output plus each row's log-sum-exp (LSE, O(N) memory). Pass 2 recomputes the logits of only
the selected rows against the keys of the chosen key range and turns them into probabilities with the
LSE of pass 1, ``p = exp(s - lse)``: these are exactly the (normalised) probabilities the forward used,
obtained without ever materialising an N x N matrix. Pass 2 sums over heads in registers
(``average_heads=True``) or writes per-head rows.

This replaces the eager ``output_attentions=True`` path attention-based pruning methods (FastV,
SparseVLM, PyramidDrop, ...) rely on, which materialises every probability.

Shapes: q ``[B, H, N, D]``; k, v ``[B, Hkv, N, D]`` (grouped-query attention, ``H % Hkv == 0``);
key_padding_mask ``[B, N]`` bool (True = real token); score_rows ``[B, R]`` integer row indices
(``-1`` = unused slot). Outputs: out ``[B, H, N, D]`` (q's dtype), scores float32 ``[B, R, nk]``
(mean over heads) or ``[B, H, R, nk]``.
"""

import torch

from vtoken.kernels.checks import (
    check_attend_and_score_args, check_kernel_dtypes, index_tensor, softmax_scale,
)
from vtoken.kernels.dispatch import cdiv, device_sms, interpreter_enabled, kernel_launcher, lazy_jit, next_pow2
from vtoken.kernels.dispatch import resolve_backend, tl, torch_reference
from vtoken.kernels.reference import attend_and_score_torch
from vtoken.kernels.triton_helpers import LOG2E, attend_block, dot_qk, normalize_rows


def attend_and_score(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    score_rows: torch.Tensor | None,
    key_start: int = 0,
    key_end: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    average_heads: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention output and the attention each key in ``[key_start, key_end)`` receives.

    Args:
        q: ``[B, H, N, D]`` queries (fp16, bf16 or fp32; any strides with a unit last stride work best).
        k, v: ``[B, Hkv, N, D]`` keys and values; query head ``h`` reads KV head ``h // (H // Hkv)``.
        score_rows: ``[B, R]`` integer query rows whose probabilities are returned (e.g. each sample's
            last real token, or its text rows); ``-1`` (or any index outside ``[0, N)``) marks an
            unused slot, which gets zeros. ``None``: attention only, ``scores`` is ``None``.
        key_start, key_end: the key range scored (default: all N keys). Probabilities are normalised
            over every key the row sees, then restricted to the range.
        key_padding_mask: ``[B, N]`` bool, True = real token. Padded keys get zero probability; a row
            that sees no real key (left padding) gets a zero output.
        scale: softmax scale, default ``1/sqrt(D)``.
        average_heads: True -> scores ``[B, R, nk]`` (mean over the H query heads);
            False -> ``[B, H, R, nk]``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see :mod:`vtoken.kernels.dispatch`).

    Returns:
        ``(out, scores)``: ``out [B, H, N, D]`` equals SDPA with ``is_causal`` and the padding mask;
        ``scores`` is float32 as described above.
    """
    B, H, Hkv, N, D, key_start, key_end = check_attend_and_score_args(
        q, k, v, score_rows, key_start, key_end, key_padding_mask
    )
    scale = softmax_scale(scale, D)
    if resolve_backend(backend, q, k, v) == "torch":
        return attend_and_score_torch(q, k, v, score_rows, key_start, key_end, key_padding_mask, scale, average_heads)
    check_kernel_dtypes(q=q, k=k, v=v)
    out, lse2 = _flash_forward(q, k, v, key_padding_mask, scale)
    if score_rows is None:
        return out, None
    scores = _score_rows(q, k, lse2, score_rows, key_start, key_end, key_padding_mask, scale, average_heads)
    return out, scores


attend_and_score_reference = torch_reference(attend_and_score)


def _mask_arg(kpm, q):
    """The padding mask as a uint8 tensor on q's device and its strides; a dummy pointer (never read) without one."""
    if kpm is None:
        return q, 0, 0
    kpm_u8 = kpm.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)
    return (kpm_u8, *kpm_u8.stride())


# --------------------------------------------------------------------------------------------------
# Pass 1: causal FlashAttention forward with row LSE
# --------------------------------------------------------------------------------------------------


def _flash_fwd_kernel(
    Q, K, V, O, LSE, KPM,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    smb, smn,
    N, H, G, qk_scale,
    N_BUCKET,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Heaviest (last) query tiles first: better tail balance for the causal triangle.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // G

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Phase 1: key tiles strictly below the diagonal tile; no causal or bounds mask needed.
    lo = pid_m * BLOCK_M
    for start_n in range(0, lo, BLOCK_N):
        offs_n = start_n + offs_n0
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=d_ok[None, :], other=0.0)
        s = dot_qk(q, k, IEEE) * qk_scale
        if HAS_MASK:
            km = tl.load(KPM + b * smb + offs_n * smn)
            s = tl.where(km[None, :] != 0, s, float("-inf"))
        m_i, l_i, acc = attend_block(m_i, l_i, acc, s, v_base, offs_n, svn, offs_d, svd, d_ok[None, :], IEEE)

    # Phase 2: the diagonal tile(s): causal and bounds masks.
    hi = tl.minimum(lo + BLOCK_M, N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = dot_qk(q, k, IEEE) * qk_scale
        see = (offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :]
        if HAS_MASK:
            km = tl.load(KPM + b * smb + offs_n * smn, mask=n_ok, other=0)
            see = see & (km[None, :] != 0)
        s = tl.where(see, s, float("-inf"))
        m_i, l_i, acc = attend_block(m_i, l_i, acc, s, v_base, offs_n, svn, offs_d, svd,
                                     n_ok[:, None] & d_ok[None, :], IEEE)

    empty = l_i == 0.0
    out = normalize_rows(acc, l_i)
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    # LSE in log2 units; +inf for rows that see nothing, so exp2(s - lse) is 0 there, never NaN.
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=m_ok)


_FWD_CONFIGS_HOPPER = [
    # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    # Chosen from sm_90 builds (ptxas resource use, D=128 bf16): none of these spills registers;
    # (128, 64) with 4 warps spilled ~370 bytes a thread and was dropped.
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 8, 2),
    (64, 64, 4, 3),
]
_fwd_launchers: dict = {}  # mode -> kernel (see dispatch.kernel_launcher)


def _flash_forward(q, k, v, kpm, scale):
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse2 = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if N == 0:
        return out, lse2
    has_mask = kpm is not None
    kpm_u8, smb, smn = _mask_arg(kpm, q)
    BLOCK_D = max(16, next_pow2(D))
    ieee = q.dtype == torch.float32
    mode, kernel = kernel_launcher(_fwd_launchers, _flash_fwd_kernel, _FWD_CONFIGS_HOPPER,
                                   ["N_BUCKET", "BLOCK_D", "HAS_MASK", "IEEE"])
    args = (
        q, k, v, out, lse2, kpm_u8,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        smb, smn,
        N, H, H // Hkv, scale * LOG2E,
        next_pow2(N),
    )
    if mode != "tuned":
        if mode == "interp":
            BM, BN, w, st = ((32, 16) if N <= 64 else (64, 32)) + (4, 1)
        elif ieee or BLOCK_D > 128:
            BM, BN, w, st = 64, 32, 4, 2
        else:
            BM, BN, w, st = 128, 64, 8, 3
        grid = (cdiv(N, BM), B * H)
        kernel[grid](*args, HAS_MASK=has_mask, IEEE=ieee, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BM, BLOCK_N=BN,
                     num_warps=w, num_stages=st)
    else:
        grid = lambda meta: (cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
        kernel[grid](*args, HAS_MASK=has_mask, IEEE=ieee, HEAD_DIM=D, BLOCK_D=BLOCK_D)
    return out, lse2


# --------------------------------------------------------------------------------------------------
# Pass 2: probabilities of the selected rows, from the forward's LSE
# --------------------------------------------------------------------------------------------------


def _score_kernel(
    Q, K, LSE, KPM, ROWS, S,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    smb, smn,
    srb, srr,
    ssp, ssb, ssh, ssr, ssn,
    N, H, G, R, key_start, key_end, qk_scale, inv_h, KV_PER_PROG, N_SPLITS,
    HAS_MASK: tl.constexpr, AVERAGE: tl.constexpr, IEEE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (key tile, row tile, sample x KV-head slice). With AVERAGE and several slices, each slice
    # writes its partial head sum to S[split] and the host sums the slices (deterministic, no atomics).
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_bs = tl.program_id(2)
    b = (pid_bs // N_SPLITS).to(tl.int64)
    split = pid_bs % N_SPLITS
    kv_lo = split * KV_PER_PROG

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    rows = tl.load(ROWS + b * srb + offs_r * srr, mask=r_ok, other=-1).to(tl.int64)
    row_ok = r_ok & (rows >= 0) & (rows < N)
    rows_c = tl.where(row_ok, rows, 0)

    offs_n = key_start + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < key_end
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    see = row_ok[:, None] & n_ok[None, :] & (offs_n[None, :] <= rows[:, None])
    if HAS_MASK:
        km = tl.load(KPM + b * smb + offs_n * smn, mask=n_ok, other=0)
        see = see & (km[None, :] != 0)
    # Skip the heads when no selected row reaches this key tile (causal upper triangle).
    max_row = tl.max(tl.where(row_ok, rows, -1), 0)
    kv_hi = tl.where(max_row >= key_start + pid_n * BLOCK_N, kv_lo + KV_PER_PROG, kv_lo)

    s_tile = S + split * ssp + b * ssb + offs_r[:, None] * ssr + (offs_n - key_start)[None, :] * ssn
    out_mask = r_ok[:, None] & n_ok[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for kvh in range(kv_lo, kv_hi):
        k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        for g in range(0, G):
            h = kvh * G + g
            q = tl.load(Q + b * sqb + h * sqh + rows_c[:, None] * sqn + offs_d[None, :] * sqd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + (b * H + h) * N + rows_c, mask=row_ok, other=float("inf"))
            s = dot_qk(q, k, IEEE)
            p = tl.where(see, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
            if AVERAGE:
                acc += p
            else:
                tl.store(s_tile + h * ssh, p, mask=out_mask)
    if AVERAGE:
        tl.store(s_tile, acc * inv_h, mask=out_mask)
    elif kv_hi == kv_lo:
        # Tile untouched by every selected row: still write its zeros, for this slice's heads.
        for h in range(kv_lo * G, (kv_lo + KV_PER_PROG) * G):
            tl.store(s_tile + h * ssh, acc, mask=out_mask)


def _score_rows(q, k, lse2, score_rows, key_start, key_end, kpm, scale, average_heads):
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    R = score_rows.shape[1]
    nk = key_end - key_start
    shape = (B, R, nk) if average_heads else (B, H, R, nk)
    if R == 0 or nk == 0:
        return torch.zeros(shape, dtype=torch.float32, device=q.device)
    rows = index_tensor(score_rows, q.device)
    has_mask = kpm is not None
    kpm_u8, smb, smn = _mask_arg(kpm, q)
    BLOCK_D = max(16, next_pow2(D))
    if interpreter_enabled() and not q.is_cuda:
        BLOCK_R, BLOCK_N, warps = 16, 32, 4
    else:
        BLOCK_R = min(64, max(16, next_pow2(R)))
        BLOCK_N = 64 if BLOCK_R == 64 else 128
        warps = 4 if BLOCK_R * BLOCK_N <= 4096 else 8
    base = cdiv(nk, BLOCK_N) * cdiv(R, BLOCK_R) * B
    # Few tiles (short N, few rows): also spread the KV heads over programs, about two waves in all.
    # With averaging, each slice needs its own partial buffer: cap those at 256 MiB.
    splits = 1
    want = cdiv(2 * device_sms(q), base)
    for cand in range(min(want, Hkv), 1, -1):
        if Hkv % cand == 0 and (not average_heads or cand * B * R * nk * 4 <= 1 << 28):
            splits = cand
            break
    if average_heads and splits > 1:
        scores = torch.empty((splits, B, R, nk), dtype=torch.float32, device=q.device)
        ssp, ssb, ssr, ssn = scores.stride()
        ssh = 0
    elif average_heads:
        scores = torch.empty(shape, dtype=torch.float32, device=q.device)
        (ssb, ssr, ssn), ssp, ssh = scores.stride(), 0, 0
    else:
        scores = torch.empty(shape, dtype=torch.float32, device=q.device)
        (ssb, ssh, ssr, ssn), ssp = scores.stride(), 0
    grid = (cdiv(nk, BLOCK_N), cdiv(R, BLOCK_R), B * splits)
    lazy_jit(_score_kernel)[grid](
        q, k, lse2, kpm_u8, rows, scores,
        *q.stride(), *k.stride(),
        smb, smn,
        *rows.stride(),
        ssp, ssb, ssh, ssr, ssn,
        N, H, G, R, key_start, key_end, scale * LOG2E, 1.0 / H, Hkv // splits, splits,
        HAS_MASK=has_mask, AVERAGE=average_heads, IEEE=q.dtype == torch.float32,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N,
        num_warps=warps, num_stages=2,
    )
    if average_heads and splits > 1:
        scores = scores.sum(0)
    return scores
