"""Triton device functions shared by vtoken's kernels; Triton inlines them into each caller.

The FlashAttention online softmax (Dao et al., 2022) is written once, here, and used by the causal
forward of :mod:`~vtoken.kernels.attend_and_score`, the split-K decode of
:mod:`~vtoken.kernels.gather_attend` and the block-diagonal forward of :mod:`~vtoken.kernels.varlen`;
the rotary embedding (:func:`rotate_half_rows`) by :mod:`~vtoken.kernels.decode_ops` and
:mod:`~vtoken.kernels.vision_rope`.

Each function is marked with :func:`~vtoken.kernels.dispatch.jit_helper` rather than decorated with
``triton.jit``: :func:`~vtoken.kernels.dispatch.lazy_jit` jits it together with the first kernel that
calls it, in the interpreter mode in force then, so importing this module never needs triton. Kernels
import these functions by name (``from vtoken.kernels.triton_helpers import softmax_step``) and call
them by that name; ``lazy_jit`` binds exactly those global names.

Conventions: logits are in log2 units (the caller folds :data:`LOG2E` into the softmax scale and
uses ``exp2``); masked logits are ``-inf``; a row that has seen only masked keys keeps ``m = -inf``,
``l = 0`` and ends as zeros, never NaN.
"""

from vtoken.kernels.dispatch import jit_helper, tl

LOG2E = 1.4426950408889634  # log2(e): scale * LOG2E turns exp(x * scale) into exp2(x * scale * LOG2E)


@jit_helper
def dot_qk(q, k, IEEE: tl.constexpr):
    """Logits ``q @ k^T`` (float32 ``[M, N]``) of a query tile ``[M, D]`` and a key tile ``[N, D]``.

    ``IEEE``: exact float32 products (for fp32 inputs); otherwise Triton's default precision.
    """
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s


@jit_helper
def softmax_step(m_i, l_i, s):
    """One online-softmax update with a block of logits ``s [M, N]`` (log2 units, masked = -inf).

    Returns ``(m_new, alpha, p, l_new)``: the new running row maxima, the factor ``alpha`` that
    rescales what was accumulated under the old maxima, the block's unnormalised probabilities ``p``
    and the new running row sums.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet: no NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return m_new, alpha, p, l_new


@jit_helper
def accumulate_pv(acc, alpha, p, v, IEEE: tl.constexpr):
    """``acc * alpha + p @ v``: rescale the output accumulator ``[M, Dv]`` and add a value tile ``[N, Dv]``
    weighted by ``p [M, N]`` (cast to v's dtype for the dot, float32 accumulation)."""
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc


@jit_helper
def attend_block(m_i, l_i, acc, s, v_base, rows, stride_row, cols, stride_col, v_mask, IEEE: tl.constexpr):
    """Fold one key/value block into the running state ``(m_i, l_i, acc)``; returns the new state.

    ``s``: the block's logits ``[M, N]`` (log2 units, masked = -inf). Its value tile is read at
    ``v_base + rows[:, None] * stride_row + cols[None, :] * stride_col`` (``rows [N]`` the block's
    key positions, ``cols`` the head-dim offsets) under ``v_mask``; masked entries read as 0.
    """
    m_new, alpha, p, l_i = softmax_step(m_i, l_i, s)
    v = tl.load(v_base + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=v_mask, other=0.0)
    acc = accumulate_pv(acc, alpha, p, v, IEEE)
    return m_new, l_i, acc


@jit_helper
def normalize_rows(acc, l_i):
    """``acc / l`` row by row; a row with ``l = 0`` (it saw no key) gives zeros."""
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


@jit_helper
def rotate_half_rows(src, dst, cos, sin, ok, cos_ok, half, dt: tl.constexpr, ROUND_PRODUCTS: tl.constexpr):
    """Rotary embedding (half-split, ``rotate_half``) of the rows at ``src`` into ``dst``: out[:half] =
    x1*c1 - x2*s1, out[half:] = x2*c2 + x1*s2, with ``x`` / ``cos`` / ``sin`` pointer blocks already
    offset to the first half's columns (``cos`` / ``sin`` may broadcast over ``x``'s rows) and masks
    ``ok`` / ``cos_ok``. ``ROUND_PRODUCTS``: each product and the sum rounded to ``dt``, as
    ``transformers`` computes a decoder's rotary embedding in that dtype; else float32 throughout and
    one rounding, as its vision towers' ``apply_rotary_pos_emb_vision``."""
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos, mask=cos_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos + half, mask=cos_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin, mask=cos_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin + half, mask=cos_ok, other=0.0).to(tl.float32)
    if ROUND_PRODUCTS:
        lo = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
        hi = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    else:
        lo = (x1 * c1 - x2 * s1).to(dt)
        hi = (x2 * c2 + x1 * s2).to(dt)
    tl.store(dst, lo, mask=ok)
    tl.store(dst + half, hi, mask=ok)
