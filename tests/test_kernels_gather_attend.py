"""gather_attend: the reference against naive per-sample attention, Triton against the reference.

Without CUDA the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1) at small
shapes; tests marked ``gpu`` run large shapes (and a CUDA-graph replay) on a CUDA device.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vtoken.kernels import HAS_TRITON, gather_attend, gather_attend_reference  # noqa: E402

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(B, H, Hkv, Q, D, L, K, *, per_head=False, idx_dtype=torch.int64, dtype=torch.float32,
                device="cpu", seed=0, lens=None):
    """Random q and KV buffer, kept lists of K sorted indices (garbage past kept_len), ragged kept_len."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g)
    kb = torch.randn(B, Hkv, L, D, generator=g)
    vb = torch.randn(B, Hkv, L, D, generator=g)
    shape = (B, Hkv) if per_head else (B,)
    idx = torch.empty(*shape, K, dtype=torch.long)
    for pos in torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape)).tolist():
        idx[tuple(pos)] = torch.randperm(L, generator=g)[:K].sort().values
    if lens is None:
        lens = torch.randint(max(1, K // 2), K + 1, (B,), generator=g)
    lens = torch.as_tensor(lens)
    for b in range(B):  # entries past kept_len must be ignored, whatever they hold
        idx[b, ..., int(lens[b]):] = -7 if b % 2 else L + 100
    cast = dict(device=device, dtype=dtype)
    return q.to(**cast), kb.to(**cast), vb.to(**cast), idx.to(device=device, dtype=idx_dtype), lens.to(device)


def naive_gather_attend(q, kb, vb, idx, lens, scale=None):
    """Float64, one sample / head / query at a time, explicit softmax."""
    B, H, Q, D = q.shape
    Hkv = kb.shape[1]
    G = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, H, Q, D, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        for h in range(H):
            kvh = h // G
            sel = (idx[b, kvh] if idx.dim() == 3 else idx[b])[:n].long().cpu()
            keys, vals = kb[b, kvh].double().cpu()[sel], vb[b, kvh].double().cpu()[sel]
            for i in range(Q):
                upto = n - Q + i + 1  # query i is kept entry n - Q + i
                if upto <= 0:
                    continue
                logits = keys[:upto] @ q[b, h, i].double().cpu() * scale
                out[b, h, i] = torch.softmax(logits, 0) @ vals[:upto]
    return out


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


REF_CASES = [
    # B, H, Hkv, Q, D, L, K, per_head
    (3, 4, 4, 1, 16, 50, 37, False),   # G = 1, decode
    (2, 8, 2, 5, 32, 100, 61, True),   # G = 4, small prefill, per-KV-head lists
    (2, 7, 1, 3, 16, 40, 23, False),   # G = 7
]


@pytest.mark.parametrize("case", REF_CASES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_reference_matches_naive(case, idx_dtype):
    B, H, Hkv, Q, D, L, K, per_head = case
    q, kb, vb, idx, lens = make_inputs(B, H, Hkv, Q, D, L, K, per_head=per_head, idx_dtype=idx_dtype, seed=K)
    out = gather_attend_reference(q, kb, vb, idx, lens)
    assert out.shape == (B, H, Q, D) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), naive_gather_attend(q, kb, vb, idx, lens), atol=2e-6, rtol=1e-5)


def test_reference_short_and_empty_lists_give_zeros():
    # sample 0 sees nothing; in sample 1, queries 0 and 1 see nothing
    q, kb, vb, idx, lens = make_inputs(3, 4, 2, 4, 16, 30, 10, seed=1, lens=[0, 2, 10])
    out = gather_attend_reference(q, kb, vb, idx, lens)
    assert torch.isfinite(out).all()
    assert out[0].abs().max() == 0 and out[1, :, :2].abs().max() == 0
    torch.testing.assert_close(out.double(), naive_gather_attend(q, kb, vb, idx, lens), atol=2e-6, rtol=1e-5)


def test_reference_equals_full_attention_when_everything_is_kept():
    """Kept = the whole buffer in order, Q = 1: plain attention of the last query over the cache."""
    q, kb, vb, _, _ = make_inputs(2, 4, 2, 1, 16, 33, 33, seed=3)
    idx = torch.arange(33).expand(2, 33)
    out = gather_attend_reference(q, kb, vb, idx, torch.tensor([33, 33]))
    full = torch.nn.functional.scaled_dot_product_attention(q, kb.repeat_interleave(2, 1), vb.repeat_interleave(2, 1))
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


def test_shape_errors_say_what_was_given():
    q, kb, vb, idx, lens = make_inputs(2, 4, 2, 1, 16, 20, 8)
    with pytest.raises(ValueError, match="kept_idx"):
        gather_attend(q, kb, vb, idx[:, None].expand(2, 3, 8), lens, backend="torch")
    with pytest.raises(TypeError, match="int32 or int64"):
        gather_attend(q, kb, vb, idx.float(), lens, backend="torch")
    with pytest.raises(ValueError, match="kept_len"):
        gather_attend(q, kb, vb, idx, lens[:1], backend="torch")


TRITON_CPU_CASES = [
    # B, H, Hkv, Q, D, L, K, per_head, dtype, num_splits
    (3, 2, 2, 1, 16, 60, 37, False, torch.float32, None),   # G = 1
    (2, 8, 2, 3, 16, 80, 45, True, torch.float32, 3),       # G = 4, split-K + merge
    (2, 7, 1, 2, 32, 50, 29, False, torch.float16, 2),      # G = 7
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CPU_CASES)
def test_triton_matches_reference_cpu(case):
    if torch.cuda.is_available():
        pytest.skip("covered at large shapes by the gpu tests")
    B, H, Hkv, Q, D, L, K, per_head, dtype, splits = case
    lens = [1 if Q == 1 else Q - 1] + [K - b for b in range(1, B)]  # includes a query that sees nothing
    q, kb, vb, idx, lens = make_inputs(B, H, Hkv, Q, D, L, K, per_head=per_head, dtype=dtype, seed=K,
                                       idx_dtype=torch.int32, lens=lens)
    out = gather_attend(q, kb, vb, idx, lens, num_splits=splits, backend="triton")
    ref = gather_attend_reference(q.float(), kb.float(), vb.float(), idx, lens)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 3e-3)


GPU_CASES = [
    # B, H, Hkv, Q, D, L, kept fraction, per_head
    (8, 32, 32, 1, 128, 4096, 0.1, False),    # LLaVA-1.5-7B heads
    (16, 28, 4, 1, 128, 8192, 0.25, True),    # Qwen2.5-VL-7B heads, G = 7
    (4, 16, 4, 16, 128, 2000, 0.5, False),    # small prefill, G = 4
    (1, 8, 8, 4, 64, 16384, 0.1, False),      # long context, split-K
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_reference_gpu(case, dtype):
    B, H, Hkv, Q, D, L, frac, per_head = case
    K = int(L * frac)
    q, kb, vb, idx, lens = make_inputs(B, H, Hkv, Q, D, L, K, per_head=per_head, dtype=dtype, device="cuda",
                                       seed=L + B)
    out = gather_attend(q, kb, vb, idx, lens)
    ref = gather_attend_reference(q.float(), kb.float(), vb.float(), idx, lens)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_with_new_kept_lists():
    """Static shapes: capture once, then change kept lists and counts in place and replay."""
    B, H, Hkv, Q, D, L, K = 4, 16, 4, 1, 128, 4096, 1024
    q, kb, vb, idx, lens = make_inputs(B, H, Hkv, Q, D, L, K, dtype=torch.bfloat16, device="cuda", seed=1)
    gather_attend(q, kb, vb, idx, lens)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gather_attend(q, kb, vb, idx, lens)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gather_attend(q, kb, vb, idx, lens)
    for seed in (2, 3):
        q2, kb2, vb2, idx2, lens2 = make_inputs(B, H, Hkv, Q, D, L, K, dtype=torch.bfloat16, device="cuda", seed=seed)
        for dst, src in ((q, q2), (kb, kb2), (vb, vb2), (idx, idx2), (lens, lens2)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        ref = gather_attend_reference(q.float(), kb.float(), vb.float(), idx, lens)
        assert rel_err(out, ref) < 1e-2
