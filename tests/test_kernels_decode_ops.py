"""Fused decode-layer ops (vtoken.kernels.decode_ops): each reference against transformers' own
Llama modules (the ops it replaces), each Triton kernel against its reference.

Without CUDA the kernels run through Triton's interpreter (float32 / float16); ``gpu`` tests run
bfloat16 at the sizes of a 7B model on a CUDA device.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rounding import within_rotary_rounding  # noqa: E402
from vtoken.kernels import HAS_TRITON  # noqa: E402
from vtoken.kernels.decode_ops import (add_rms_norm, add_rms_norm_reference, rope_qk,  # noqa: E402
                                       rope_qk_reference, rope_qk_store, rope_qk_store_reference, silu_mul,
                                       silu_mul_reference)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2).to(device=device, dtype=dtype)


def _rotary(B, S, Dh, dtype, device="cpu", seed=3):
    """cos / sin of transformers' Llama rotary embedding at random positions."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=Dh * 2, num_attention_heads=2, head_dim=Dh)
    rope = LlamaRotaryEmbedding(cfg).to(device)
    pos = torch.randint(0, 4000, (B, S), generator=torch.Generator().manual_seed(seed)).to(device)
    return rope(torch.zeros(1, dtype=dtype, device=device), pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_equal_transformers_llama_ops(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, apply_rotary_pos_emb

    D, Dh = 48, 16
    norm = LlamaRMSNorm(D, eps=1e-5)
    norm.weight.data = _randn(D, seed=9)
    norm = norm.to(dtype)
    x, r = _randn(3, 5, D, dtype=dtype, seed=1), _randn(3, 5, D, dtype=dtype, seed=2)
    normed, s = add_rms_norm_reference(x, r, norm.weight, 1e-5)
    assert torch.equal(s, r + x)
    assert torch.equal(normed, norm(r + x))
    assert torch.equal(add_rms_norm_reference(x, None, norm.weight, 1e-5)[0], norm(x))

    q, k = _randn(2, 4, 3, Dh, dtype=dtype, seed=4), _randn(2, 2, 3, Dh, dtype=dtype, seed=5)
    cos, sin = _rotary(2, 3, Dh, dtype)
    qe, ke = apply_rotary_pos_emb(q, k, cos, sin)
    qr, kr = rope_qk_reference(q, k, cos, sin)
    assert torch.equal(qr, qe) and torch.equal(kr, ke)

    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=40, hidden_act="silu", num_attention_heads=4,
                               num_key_value_heads=4)).to(dtype)
    h = _randn(3, D, dtype=dtype, seed=6)
    gate, up = mlp.gate_proj(h), mlp.up_proj(h)
    assert torch.equal(mlp.down_proj(silu_mul_reference(gate, up)), mlp(h))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,D", [(1, 64), (7, 100), (4, 4096)])
def test_add_rms_norm_kernel_matches_reference(dtype, rows, D):
    x, r = _randn(rows, D, dtype=dtype, seed=rows), _randn(rows, D, dtype=dtype, seed=D)
    w = _randn(D, dtype=dtype, seed=7)
    for res in (r, None):
        got, got_s = add_rms_norm(x, res, w, 1e-6, backend="triton")
        want, want_s = add_rms_norm_reference(x, res, w, 1e-6)
        assert torch.equal(got_s, want_s)
        tol = 1e-5 if dtype == torch.float32 else 2e-3  # float16: one rounding step of the normalised row
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,Hkv,S,Dh", [(1, 4, 4, 1, 16), (3, 8, 2, 1, 128), (2, 3, 1, 5, 24)])
def test_rope_qk_kernel_matches_reference(dtype, B, H, Hkv, S, Dh):
    q, k = _randn(B, H, S, Dh, dtype=dtype, seed=1), _randn(B, Hkv, S, Dh, dtype=dtype, seed=2)
    cos, sin = _rotary(B, S, Dh, dtype)
    q0, k0 = q.clone(), k.clone()
    gq, gk = rope_qk(q, k, cos, sin, backend="triton")
    wq, wk = rope_qk_reference(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # out of place
    torch.testing.assert_close(gq, wq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gk, wk, rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 11008), (3, 1, 37), (2, 2050)])
def test_silu_mul_kernel_matches_reference(dtype, shape):
    g, u = _randn(*shape, dtype=dtype, seed=1), _randn(*shape, dtype=dtype, seed=2)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(silu_mul(g, u, backend="triton"), silu_mul_reference(g, u), rtol=tol, atol=tol)


@needs_triton
def test_silu_mul_kernel_reads_the_halves_of_a_merged_gate_up_output():
    """The two halves of one ``[..., 2F]`` GEMM output (strided rows) give what contiguous copies give."""
    gu = _randn(3, 2, 2 * 37, seed=3)
    gate, up = gu.split(37, dim=-1)
    assert not gate.is_contiguous()
    want = silu_mul_reference(gate.contiguous(), up.contiguous())
    torch.testing.assert_close(silu_mul(gate, up, backend="triton"), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(silu_mul(gate, up, backend="torch"), want, rtol=1e-6, atol=1e-6)


def _decode_qkv(B=3, H=4, Hkv=2, Dh=8, L=7, dtype=torch.float32, seed=0):
    """q, k, v as one merged projection leaves them (strided parts of ``[B, 1, (H + 2 Hkv) Dh]``),
    decode rotary tables, KV buffers with some history and a write slot."""
    qkv = _randn(B, 1, (H + 2 * Hkv) * Dh, dtype=dtype, seed=seed)
    q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    cos, sin = _rotary(B, 1, Dh, dtype, seed=seed + 1)
    k_buf, v_buf = _randn(B, Hkv, L, Dh, dtype=dtype, seed=seed + 2), _randn(B, Hkv, L, Dh, dtype=dtype, seed=seed + 3)
    return q, k, v, cos, sin, k_buf, v_buf, torch.tensor([L - 3])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_qk_store_is_rope_qk_then_the_cache_write(backend, dtype):
    """Against the two steps it replaces: rope_qk on contiguous heads, then StaticKV.update's index
    copies at the slot; every other slot of the buffers untouched."""
    q, k, v, cos, sin, k_buf, v_buf, slot = _decode_qkv(dtype=dtype)
    B, Hkv, L, Dh = k_buf.shape
    heads = lambda t: t.reshape(B, 1, -1, Dh).transpose(1, 2).contiguous()  # noqa: E731
    want_q, want_k = rope_qk_reference(heads(q), heads(k), cos, sin)
    want_kb, want_vb = k_buf.clone(), v_buf.clone()
    want_kb.index_copy_(2, slot, want_k)
    want_vb.index_copy_(2, slot, heads(v))
    got_q = rope_qk_store(q, k, v, cos, sin, k_buf, v_buf, slot, backend=backend)
    tol = 0 if backend == "torch" else (1e-6 if dtype == torch.float32 else 1e-3)
    torch.testing.assert_close(got_q, want_q, rtol=tol, atol=tol)
    torch.testing.assert_close(k_buf, want_kb, rtol=tol, atol=tol)
    assert torch.equal(v_buf, want_vb)  # the values are copied, not computed
    assert got_q.shape == (B, q.shape[-1] // Dh, 1, Dh) and got_q.is_contiguous()


def test_rope_qk_store_rejects_bad_arguments():
    q, k, v, cos, sin, k_buf, v_buf, slot = _decode_qkv()
    with pytest.raises(ValueError, match="one decode token"):
        rope_qk_store(q.expand(3, 2, -1), k, v, cos, sin, k_buf, v_buf, slot)
    with pytest.raises(ValueError, match="cos and sin"):
        rope_qk_store(q, k, v, cos.half(), sin.half(), k_buf, v_buf, slot)
    with pytest.raises(ValueError, match="contiguous"):
        wide = torch.zeros(*k_buf.shape[:3], 2 * k_buf.shape[3])
        rope_qk_store(q, k, v, cos, sin, wide[..., :k_buf.shape[3]], v_buf, slot)  # strided buffer rows


def test_decode_ops_reject_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(x, None, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.randn(2, 9), torch.ones(8), 1e-6)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        silu_mul(x.long(), x.long())
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul(x.t(), x.t())
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    with pytest.raises(ValueError, match="dtype"):
        rope_qk(q, k, cos.half(), sin.half())
    with pytest.raises(ValueError, match="cos and sin must be"):
        rope_qk(q, k, cos[:, :, :4], sin[:, :, :4])
    with pytest.raises(ValueError, match="even"):
        rope_qk(q[..., :7].contiguous(), k[..., :7].contiguous(), cos[..., :7].contiguous(), sin[..., :7].contiguous())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_ops_bf16_on_gpu_at_7b_sizes():
    """bfloat16, batch 32, Llama-7B sizes: the residual sum exactly as transformers computes it;
    the norm, the rotary embedding and the gate within one bfloat16 rounding step (the compiled
    kernels may keep an intermediate product in float32 where transformers rounds it)."""
    dt = torch.bfloat16
    x, r, w = _randn(32, 1, 4096, dtype=dt, seed=1, device="cuda"), _randn(32, 1, 4096, dtype=dt, seed=2,
                                                                       device="cuda"), _randn(4096, dtype=dt, seed=3,
                                                                                            device="cuda")
    got, got_s = add_rms_norm(x, r, w, 1e-5)
    want, want_s = add_rms_norm_reference(x, r, w, 1e-5)
    assert torch.equal(got_s, want_s)
    assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs() + 1e-6).all()
    q, k = _randn(32, 32, 1, 128, dtype=dt, seed=4, device="cuda"), _randn(32, 32, 1, 128, dtype=dt, seed=5, device="cuda")
    cos, sin = _rotary(32, 1, 128, dt, device="cuda")
    gq, gk = rope_qk(q, k, cos, sin)
    wq, wk = rope_qk_reference(q, k, cos, sin)
    c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    for x, got, want in ((q, gq, wq), (k, gk, wk)):
        xf = x.float()
        # the two terms of x * cos + rotate_half(x) * sin: rounding them or not moves the sum by at
        # most a bfloat16 step of each term (which matters where they cancel), plus one of the sum
        terms = (xf * c).abs() + (torch.cat((-xf[..., 64:], xf[..., :64]), -1) * s).abs()
        got, want = got.float(), want.float()
        assert ((got - want).abs() <= 2 ** -7 * (terms + want.abs()) + 1e-6).all()
    g, u = _randn(32, 1, 11008, dtype=dt, seed=6, device="cuda"), _randn(32, 1, 11008, dtype=dt, seed=7, device="cuda")
    got, want = silu_mul(g, u).float(), silu_mul_reference(g, u).float()
    # silu may land one bfloat16 step from PyTorch's (another exp), then the product is rounded
    assert ((got - want).abs() <= 2 ** -6 * want.abs() + 1e-6).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rope_qk_store_bf16_on_gpu_at_7b_sizes():
    """The compiled kernel at Llama-7B decode sizes (batch 32, 32 heads of 128): the values copied
    exactly, the rotated rows within a bfloat16 step of the reference, nothing else written."""
    parts = _decode_qkv(B=32, H=32, Hkv=32, Dh=128, L=48, dtype=torch.bfloat16, seed=5)
    q, k, v, cos, sin, k_buf, v_buf, slot = (t.cuda() for t in parts)
    want_kb, want_vb = k_buf.clone(), v_buf.clone()
    want_q = rope_qk_store_reference(q, k, v, cos, sin, want_kb, want_vb, slot)
    got_q = rope_qk_store(q, k, v, cos, sin, k_buf, v_buf, slot)
    assert torch.equal(v_buf, want_vb)
    B, Hkv, _, Dh = k_buf.shape
    heads = lambda t: t.reshape(B, 1, -1, Dh).transpose(1, 2)  # noqa: E731
    c, s, at = cos.unsqueeze(1), sin.unsqueeze(1), slot.item()
    # the reference (transformers' Llama rotary) multiplies in bfloat16, the kernel in float32
    assert within_rotary_rounding(got_q, want_q, heads(q), c, s, torch.bfloat16).all()
    assert within_rotary_rounding(k_buf[:, :, at:at + 1], want_kb[:, :, at:at + 1], heads(k), c, s, torch.bfloat16).all()
    assert not within_rotary_rounding(heads(q).contiguous(), want_q, heads(q), c, s, torch.bfloat16).all()  # not rotated
    rest = torch.ones(k_buf.shape[2], dtype=torch.bool)
    rest[slot.item()] = False
    assert torch.equal(k_buf[:, :, rest], want_kb[:, :, rest])
