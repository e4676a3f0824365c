"""PyTorch implementations of vtoken's kernels (the CPU path, and the expectation the Triton tests use).

They compute the same functions as the Triton kernels with stock PyTorch ops, and stay memory-frugal
where reasonable: :func:`attend_and_score_torch` takes its attention output from
``scaled_dot_product_attention`` and builds probabilities only for the selected query rows (in row
chunks), never an N x N probability matrix.

The public references (``attend_and_score_reference``, ``gather_attend_reference``,
``varlen_attention_reference``, exported by :mod:`vtoken.kernels`) are the kernel functions with
``backend="torch"`` (:func:`vtoken.kernels.dispatch.torch_reference`): they check their arguments
in :mod:`vtoken.kernels.checks` and land here. The functions below take checked arguments and the
softmax scale as a float.

Conventions shared with the kernels (see each kernel's module for the full contract):

- causal attention: query ``i`` sees key ``j`` iff ``j <= i`` (and the key is not padding);
- a query row that sees no key gives an output of zeros and probabilities of zeros, never NaN;
- grouped-query attention: query head ``h`` reads KV head ``h // (H // Hkv)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of a [B, H, rows, N] float32 probability block built at once by the scoring reference.
_SCORE_CHUNK_ELEMS = 1 << 25
# Query rows per SDPA call when an explicit (padding) mask is needed; bounds the mask to B*rows*N bytes.
_SDPA_ROW_CHUNK = 1024


def _sdpa(q, k, v, mask=None, is_causal=False, scale=None):
    """SDPA with grouped-query attention (k/v may have fewer heads than q)."""
    if k.shape[1] != q.shape[1]:
        try:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
            )
        except TypeError:  # torch < 2.5: no enable_gqa
            g = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def attend_and_score_torch(q, k, v, score_rows, key_start, key_end, key_padding_mask, scale, average_heads):
    """Causal attention output plus the attention probabilities of selected rows.

    Shapes: q ``[B, H, N, D]``; k, v ``[B, Hkv, N, D]``; key_padding_mask ``[B, N]`` bool (True = real
    token); score_rows ``[B, R]`` integer query rows (``-1`` or out of range = unused slot).

    Returns ``out [B, H, N, D]`` (q's dtype) and ``scores`` float32: ``[B, R, nk]`` averaged over the H
    heads, or ``[B, H, R, nk]`` with ``average_heads=False``, where ``nk = key_end - key_start``. The
    probabilities are softmax over all keys the row sees (causal + padding), then sliced to the key
    range; unused rows are zeros.
    """
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    out = _causal_output(q, k, v, key_padding_mask, scale)
    if score_rows is None:
        return out, None
    scores = _row_probabilities(q, k, score_rows, key_start, key_end, key_padding_mask, scale, average_heads)
    return out, scores


def _causal_output(q, k, v, kpm, scale):
    B, H, N, D = q.shape
    if kpm is None:
        return _sdpa(q, k, v, is_causal=True, scale=scale)
    out = torch.empty_like(q)
    ar = torch.arange(N, device=q.device)
    for i0 in range(0, N, _SDPA_ROW_CHUNK):
        i1 = min(i0 + _SDPA_ROW_CHUNK, N)
        causal = ar[None, :i1] <= ar[i0:i1, None]  # [c, i1]
        mask = causal[None, None] & kpm[:, None, None, :i1]  # [B, 1, c, i1]
        out[:, :, i0:i1] = _sdpa(q[:, :, i0:i1], k[:, :, :i1], v[:, :, :i1], mask=mask, scale=scale)
    # Rows that see no real key (left padding) -> zeros, whatever the SDPA backend made of them.
    sees_key = kpm.cumsum(dim=-1) > 0  # [B, N]
    return torch.where(sees_key[:, None, :, None], out, out.new_zeros(()))


def _row_probabilities(q, k, score_rows, key_start, key_end, kpm, scale, average_heads):
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    rows = score_rows.to(device=q.device, dtype=torch.long)
    R = rows.shape[1]
    nk = key_end - key_start
    shape = (B, R, nk) if average_heads else (B, H, R, nk)
    scores = torch.zeros(shape, dtype=torch.float32, device=q.device)
    if R == 0 or nk == 0:
        return scores
    valid = (rows >= 0) & (rows < N)  # [B, R]
    rows_c = torch.where(valid, rows, torch.zeros_like(rows))
    kf = k.float().transpose(-1, -2)  # [B, Hkv, D, N]
    keys = torch.arange(N, device=q.device)
    chunk = max(1, _SCORE_CHUNK_ELEMS // max(1, B * H * N))
    for r0 in range(0, R, chunk):
        r1 = min(r0 + chunk, R)
        rr = rows_c[:, r0:r1]  # [B, c]
        c = r1 - r0
        qs = q.gather(2, rr[:, None, :, None].expand(B, H, c, D)).float()  # [B, H, c, D]
        logits = (qs.view(B, Hkv, G * c, D) @ kf).view(B, H, c, N) * scale
        see = (keys[None, None, :] <= rr[:, :, None]) & valid[:, r0:r1, None]  # [B, c, N]
        if kpm is not None:
            see = see & kpm[:, None, :]
        logits = logits.masked_fill(~see[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)[..., key_start:key_end]  # [B, H, c, nk]
        if average_heads:
            scores[:, r0:r1] = probs.mean(dim=1)
        else:
            scores[:, :, r0:r1] = probs
    return scores


def gather_attend_torch(q, k_buf, v_buf, kept_idx, kept_len, scale, return_row=False):
    """Attention of Q queries over the kept entries of a KV buffer (gather + SDPA).

    Shapes: q ``[B, H, Q, D]``; k_buf, v_buf ``[B, Hkv, L, D]``; kept_idx ``[B, K]`` or ``[B, Hkv, K]``
    indices into L; kept_len ``[B]``: sample b uses ``kept_idx[b, ..., :kept_len[b]]`` (the rest of
    the row is ignored, whatever it holds). Query ``i`` is kept entry ``kept_len - Q + i`` and sees
    kept entries ``t <= kept_len - Q + i``. Returns ``[B, H, Q, D]`` in q's dtype; a query that sees
    nothing gives zeros. ``return_row``: ``(out, row)``, row ``[B, H, K]`` float32 the last query's
    softmax probabilities over the kept list per head (0 past ``kept_len``; all 0 if it sees nothing).
    """
    B, H, Q, D = q.shape
    Hkv, L, K = k_buf.shape[1], k_buf.shape[2], kept_idx.shape[-1]
    idx = kept_idx.to(torch.long).clamp(0, max(L - 1, 0))
    if idx.dim() == 2:
        idx = idx[:, None, :].expand(B, Hkv, K)
    gi = idx[..., None].expand(B, Hkv, K, D)
    kg = k_buf.gather(2, gi)
    vg = v_buf.gather(2, gi)
    t = torch.arange(K, device=q.device)
    klen = kept_len.to(device=q.device, dtype=torch.long).clamp(0, K)
    limit = klen[:, None] - Q + torch.arange(Q, device=q.device)[None, :]  # [B, Q]
    see = (t[None, None, :] <= limit[:, :, None]) & (t[None, None, :] < klen[:, None, None])  # [B, Q, K]
    # entries past kept_len may hold anything (stale or uninitialised buffer rows): zero them, so a
    # NaN there cannot reach the output through 0 * NaN in the probability-value product
    live = (t[None, :] < klen[:, None])[:, None, :, None]  # [B, 1, K, 1]
    kg = torch.where(live, kg, kg.new_zeros(()))
    vg = torch.where(live, vg, vg.new_zeros(()))
    out = _sdpa(q, kg, vg, mask=see[:, None], scale=scale)
    sees_any = see.any(dim=-1)  # [B, Q]
    out = torch.where(sees_any[:, None, :, None], out, out.new_zeros(()))
    if not return_row:
        return out
    kf = kg.float().repeat_interleave(H // Hkv, dim=1)  # [B, H, K, D]
    logits = (q[:, :, -1:].float() @ kf.transpose(-1, -2)) * scale  # [B, H, 1, K]
    probs = torch.softmax(logits.masked_fill(~see[:, None, -1:], float("-inf")), dim=-1)
    return out, torch.nan_to_num(probs, nan=0.0)[:, :, 0]


def varlen_attention_torch(q, k, v, cu_seqlens, scale):
    """Block-diagonal (per-segment, non-causal) attention: one SDPA per segment (with whichever SDPA
    backends the caller allows: ``long_segment_attention`` runs it with cuDNN's alone).

    Shapes: q, k, v ``[Total, H, D]``; cu_seqlens ``[S+1]`` (a tensor, or its host copy as a sequence
    of ints) with ``cu_seqlens[0] = 0`` and ``cu_seqlens[-1] = Total``; tokens
    ``cu_seqlens[s]:cu_seqlens[s+1]`` attend only to each other.
    Returns ``[Total, H, D]``. This is what ``transformers``' SDPA path of windowed vision towers does.
    """
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        if s1 <= s0:
            continue
        seg = [x[s0:s1].transpose(0, 1)[None] for x in (q, k, v)]  # [1, H, n, D]
        out[s0:s1] = _sdpa(*seg, scale=scale)[0].transpose(0, 1)
    return out


def gather_attend_lowbit_torch(q, k_buf, v_buf, kept_idx, kept_len, low, scale):
    """:func:`gather_attend_torch` over the kept entries plus low-bit entries read first.

    ``low`` is a :class:`vtoken.kernels.gather_attend_lowbit.LowBitEntries`: quantised keys / values
    ``[B, Hkv, P, D * bits / 8]`` uint8 with per-token ``scale`` / ``lo`` ``[B, Hkv, P, 1]`` (the grid
    of :func:`vtoken.kernels.lowbit.quantize_tokens`), an index list ``idx [B, n_low]`` into P and a
    count ``length [B]``. Sample b attends to the dequantised entries ``idx[b, :length[b]]``
    (``lo + code * scale`` in ``scale``'s dtype, then k_buf's dtype), which precede every kept entry
    (every query sees them), then to ``kept_idx[b, :kept_len[b]]`` as in :func:`gather_attend_torch`.
    kept_idx ``[B, K]`` only (one list for all KV heads). Returns ``[B, H, Q, D]``.
    """
    from vtoken.kernels.lowbit import dequantize_tokens

    B, Hkv, K = k_buf.shape[0], k_buf.shape[1], kept_idx.shape[-1]
    n_low, P = low.idx.shape[-1], low.k_packed.shape[2]
    li = low.idx.to(torch.long).clamp(0, max(P - 1, 0))[:, None, :, None]

    def entries(packed, sc, lo, buf):
        g = lambda t: t.gather(2, li.expand(B, Hkv, n_low, t.shape[-1]))  # noqa: E731
        deq = dequantize_tokens(g(packed), g(sc), g(lo), low.bits).to(buf.dtype)
        full = buf.gather(2, kept_idx.to(torch.long).clamp(0, max(buf.shape[2] - 1, 0))[:, None, :, None]
                          .expand(B, Hkv, K, buf.shape[3]))
        return torch.cat([deq, full], dim=2)  # [B, Hkv, n_low + K, D]

    kg = entries(low.k_packed, low.k_scale, low.k_lo, k_buf)
    vg = entries(low.v_packed, low.v_scale, low.v_lo, v_buf)
    # one list over [low entries | kept entries]: the first length[b] low ones, then the kept ones
    n_first = low.length.to(device=q.device, dtype=torch.long).clamp(0, n_low)[:, None]  # [B, 1]
    p = torch.arange(n_low + K, device=q.device)[None, :]
    idx = torch.where(p < n_first, p, n_low + (p - n_first).clamp(0, max(K - 1, 0)))
    total = n_first[:, 0] + kept_len.to(device=q.device, dtype=torch.long).clamp(0, K)
    return gather_attend_torch(q, kg, vg, idx, total, scale)
