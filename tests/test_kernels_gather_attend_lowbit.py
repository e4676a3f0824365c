"""gather_attend_lowbit (the dequantising read of mixed-precision KV): the reference against
naive per-sample attention over the dequantised low-bit entries followed by the kept entries."""

import pytest
import torch

from test_kernels_gather_attend import make_inputs
from vtoken.kernels import LowBitEntries, gather_attend_lowbit, gather_attend_lowbit_reference
from vtoken.kernels.lowbit import dequantize_tokens, quantize_tokens


def low_entries(B, Hkv, P, D, bits, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, Hkv, P, D, generator=g), torch.randn(B, Hkv, P, D, generator=g)
    n_low = max(lens) + 1
    idx = torch.stack([torch.randperm(P, generator=g)[:n_low] for _ in range(B)])
    for b, m in enumerate(lens):
        idx[b, m:] = P + 50  # past length: ignored, whatever it holds
    return LowBitEntries(*quantize_tokens(k, bits), *quantize_tokens(v, bits), idx, torch.tensor(lens), bits)


def naive(q, kb, vb, idx, lens, low, scale):
    B, H, Q, D = q.shape
    G = H // kb.shape[1]
    out = torch.zeros_like(q)
    deq_k = dequantize_tokens(low.k_packed, low.k_scale, low.k_lo, low.bits)
    deq_v = dequantize_tokens(low.v_packed, low.v_scale, low.v_lo, low.bits)
    for b in range(B):
        m, n = int(low.length[b]), int(lens[b])
        li, ki = low.idx[b, :m], idx[b, :n]
        for h in range(H):
            keys = torch.cat([deq_k[b, h // G, li], kb[b, h // G, ki]])
            vals = torch.cat([deq_v[b, h // G, li], vb[b, h // G, ki]])
            for i in range(Q):
                see = m + n - Q + i + 1  # low entries, then the kept ones up to the query's own
                if see <= 0:
                    continue
                p = torch.softmax(q[b, h, i] @ keys[:see].T * scale, dim=-1)
                out[b, h, i] = p @ vals[:see]
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("B, H, Hkv, Q, D, L, K, P", [(2, 4, 2, 1, 16, 23, 9, 7), (3, 2, 1, 3, 8, 17, 11, 13)])
def test_reference_matches_naive(bits, B, H, Hkv, Q, D, L, K, P):
    q, kb, vb, idx, lens = make_inputs(B, H, Hkv, Q, D, L, K)
    low = low_entries(B, Hkv, P, D, bits, [min(P - 1, 2 + b) for b in range(B)])
    got = gather_attend_lowbit_reference(q, kb, vb, idx, lens, low)
    torch.testing.assert_close(got, naive(q, kb, vb, idx, lens, low, D ** -0.5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gather_attend_lowbit(q, kb, vb, idx, lens, low), got)  # "auto" picks the reference


def test_no_low_entries_is_gather_attend_and_shapes_are_checked():
    from vtoken.kernels import gather_attend_reference

    q, kb, vb, idx, lens = make_inputs(2, 4, 2, 1, 16, 19, 8)
    low = low_entries(2, 2, 5, 16, 4, [0, 0])
    torch.testing.assert_close(gather_attend_lowbit(q, kb, vb, idx, lens, low),
                               gather_attend_reference(q, kb, vb, idx, lens))
    with pytest.raises(ValueError, match="k_packed"):
        gather_attend_lowbit(q, kb, vb, idx, lens, low._replace(k_packed=low.k_packed[..., :-1]))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("B, H, Hkv, Q, D, L, K, P", [(2, 4, 2, 1, 16, 23, 9, 7), (3, 2, 1, 3, 8, 40, 33, 21)])
def test_triton_matches_reference_cpu(bits, B, H, Hkv, Q, D, L, K, P):
    from vtoken.kernels import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    q, kb, vb, idx, lens = make_inputs(B, H, Hkv, Q, D, L, K)
    low = low_entries(B, Hkv, P, D, bits, [min(P - 1, 2 + 9 * b) for b in range(B)])
    ref = gather_attend_lowbit_reference(q, kb, vb, idx, lens, low)
    torch.testing.assert_close(gather_attend_lowbit(q, kb, vb, idx, lens, low, backend="triton"), ref,
                               rtol=1e-4, atol=1e-5)
    empty = low._replace(length=torch.zeros(B, dtype=torch.long))
    torch.testing.assert_close(gather_attend_lowbit(q, kb, vb, idx, lens, empty, backend="triton"),
                               gather_attend_lowbit_reference(q, kb, vb, idx, lens, empty), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_gpu_and_replays_in_a_graph(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    B, H, Hkv, Q, D, L, K, P = 4, 32, 8, 1, 128, 700, 650, 576
    q, kb, vb, idx, lens = (t.cuda() for t in make_inputs(B, H, Hkv, Q, D, L, K))
    q, kb, vb = q.to(dtype), kb.to(dtype), vb.to(dtype)
    low = low_entries(B, Hkv, P, D, 2, [500, 0, 17, 575])
    low = LowBitEntries(*(t.cuda() for t in low[:6]), low.idx.cuda(), low.length.cuda(), low.bits)
    low = low._replace(k_scale=low.k_scale.to(dtype), k_lo=low.k_lo.to(dtype), v_scale=low.v_scale.to(dtype),
                       v_lo=low.v_lo.to(dtype))
    ref = gather_attend_lowbit_reference(q, kb, vb, idx, lens, low)
    out = gather_attend_lowbit(q, kb, vb, idx, lens, low)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = gather_attend_lowbit(q, kb, vb, idx, lens, low)
    low.length.copy_(torch.tensor([3, 100, 0, 200], device="cuda"))
    graph.replay()
    torch.testing.assert_close(static, gather_attend_lowbit_reference(q, kb, vb, idx, lens, low), rtol=2e-2, atol=2e-2)
