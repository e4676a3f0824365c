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


def naive_last_row(q, kb, idx, lens, scale=None):
    """Float64 ``[B, H, K]``: each head's softmax of the last query over its kept list (0 past kept_len)."""
    B, H, Q, D = q.shape
    G, K = H // kb.shape[1], idx.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    row = torch.zeros(B, H, K, dtype=torch.float64)
    for b in range(B):
        n = min(int(lens[b]), K)
        for h in range(H):
            sel = (idx[b, h // G] if idx.dim() == 3 else idx[b])[:n].long().cpu()
            if n:
                row[b, h, :n] = torch.softmax(kb[b, h // G].double().cpu()[sel] @ q[b, h, -1].double().cpu() * scale, 0)
    return row


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
    (2, 8, 2, 1, 24, 70, 51, True, torch.float16, None),    # G = 4, per-head lists, D = 24, auto splits
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
    ref, ref_row = gather_attend_reference(q.float(), kb.float(), vb.float(), idx, lens, return_row=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 3e-3)
    # return_row: the same output, and the row from the kernel's own logits and (merged) log-sum-exp
    out2, row = gather_attend(q, kb, vb, idx, lens, num_splits=splits, return_row=True, backend="triton")
    assert torch.equal(out2, out) and row.dtype == torch.float32 and torch.isfinite(row).all()
    assert rel_err(row, ref_row) < (1e-5 if dtype == torch.float32 else 3e-3)


@needs_triton
def test_triton_strided_inputs_int64_lists_and_clamped_counts_cpu():
    """q and the buffers as strided views, int64 lists, kept_len of 0 and above K, an explicit scale."""
    if torch.cuda.is_available():
        pytest.skip("covered at large shapes by the gpu tests")
    B, H, Hkv, Q, D, L, K = 3, 8, 2, 2, 16, 45, 33
    q, kb, vb, idx, lens = make_inputs(B, H, Hkv, Q, D, L, K, seed=5, lens=[0, K, 20])
    lens[1] = K + 9  # counts as K
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Q, H, D] memory, as attention projections give
    big = torch.randn(2, B, Hkv, L + 7, D)
    kb = big[0, :, :, 3:L + 3].copy_(kb)  # views with a longer row stride
    vb = big[1, :, :, 3:L + 3].copy_(vb)
    out, row = gather_attend(q, kb, vb, idx, lens.to(torch.int32), scale=0.3, num_splits=2, return_row=True,
                             backend="triton")
    ref, ref_row = gather_attend_reference(q, kb, vb, idx, lens, scale=0.3, return_row=True)
    assert out[0].abs().max() == 0 and torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5
    assert row[0].abs().max() == 0 and torch.isfinite(row).all() and rel_err(row, ref_row) < 1e-5
    torch.testing.assert_close(ref_row.double(), naive_last_row(q, kb, idx, lens, scale=0.3), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ref.double(), naive_gather_attend(q, kb, vb, idx, lens.clamp(max=K), scale=0.3),
                               atol=2e-6, rtol=1e-5)


@needs_triton
def test_triton_launch_depends_on_shapes_only_and_reads_no_data(monkeypatch):
    """CUDA-graph safety by construction: the host side of the Triton path reads no tensor data and
    launches the same grids and arguments whatever kept_idx / kept_len hold."""
    import importlib

    mod = importlib.import_module("vtoken.kernels.gather_attend")
    launches = []

    def describe(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", a.data_ptr(), tuple(a.shape), a.stride(), a.dtype, a.device)
        return a

    class Recorder:  # stands in for the jitted kernels: records launches, runs nothing
        def __init__(self, fn):
            self.name = fn.__name__

        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((self.name, grid, [describe(a) for a in args], meta))

    monkeypatch.setattr(mod, "lazy_jit", Recorder)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # backend="triton" on CPU tensors
    B, H, Hkv, Q, D, L, K = 2, 8, 2, 1, 16, 300, 200
    q, kb, vb, idx, lens = make_inputs(B, H, Hkv, Q, D, L, K, per_head=True, idx_dtype=torch.int32, seed=1)
    lens = lens.to(torch.int32)

    def forbidden(*args, **kwargs):
        raise AssertionError("the host read tensor data")

    runs = []
    for new_lens, seed in (([K, 3], 2), ([0, 57], 3)):
        _, _, _, idx2, lens2 = make_inputs(B, H, Hkv, Q, D, L, K, per_head=True, idx_dtype=torch.int32, seed=seed,
                                           lens=new_lens)
        idx.copy_(idx2)
        lens.copy_(lens2)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"):
                m.setattr(torch.Tensor, name, forbidden)
            gather_attend(q, kb, vb, idx, lens, backend="triton")
        runs.append(list(launches))
        launches.clear()
    assert [name for name, *_ in runs[0]] == ["_split_kernel", "_merge_kernel"]  # the split-K path
    assert runs[0][0][2][3:5] == [describe(idx), describe(lens)]  # read in place on the device, no copies

    def by_shape(run):  # the output and partial buffers are fresh allocations: compare them by shape
        return [(n, g, [a[2:] if isinstance(a, tuple) and a[0] == "tensor" else a for a in args], meta)
                for n, g, args, meta in run]

    assert by_shape(runs[0]) == by_shape(runs[1])


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
    out, row = gather_attend(q, kb, vb, idx, lens, return_row=True)
    ref, ref_row = gather_attend_reference(q.float(), kb.float(), vb.float(), idx, lens, return_row=True)
    assert torch.isfinite(out).all() and torch.isfinite(row).all()
    assert rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert rel_err(row, ref_row) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("per_head,Q,num_splits,return_row", [(False, 1, None, False), (True, 1, None, False),
                                                              (True, 4, None, False), (False, 2, 1, False),
                                                              (False, 1, None, True), (False, 2, 1, True)])
def test_cuda_graph_replay_with_new_kept_lists(per_head, Q, num_splits, return_row):
    """Static shapes: capture once, change kept_idx / kept_len contents (then q and the buffers) in place,
    replay; the replay matches the reference and the eager call bit for bit (the row too, with
    ``return_row``: split-K merged and one split)."""
    B, H, Hkv, D, L, K = 4, 28, 4, 128, 4096, 1024  # G = 7; split-K unless num_splits=1
    mk = dict(per_head=per_head, idx_dtype=torch.int32, dtype=torch.bfloat16, device="cuda")
    q, kb, vb, idx, lens = make_inputs(B, H, Hkv, Q, D, L, K, seed=1, **mk)
    lens = lens.to(torch.int32)  # as the static-cache engine keeps its counts

    def run():
        got = gather_attend(q, kb, vb, idx, lens, num_splits=num_splits, return_row=return_row)
        return got if return_row else (got, None)

    stream = torch.cuda.Stream()  # warm-up (compile) on a side stream, as torch.cuda.graphs recommends
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
        torch.cuda.set_sync_debug_mode("error")  # a compiled call makes no host sync
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, row = run()
    for seed, new_lens, new_data in ((2, [K, 1, 0, K // 3], False), (3, None, True), (4, [7, K, K - 1, 2], False)):
        q2, kb2, vb2, idx2, lens2 = make_inputs(B, H, Hkv, Q, D, L, K, seed=seed, lens=new_lens, **mk)
        idx.copy_(idx2)
        lens.copy_(lens2)
        if new_data:
            q.copy_(q2)
            kb.copy_(kb2)
            vb.copy_(vb2)
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_row = gather_attend_reference(q.float(), kb.float(), vb.float(), idx, lens, return_row=True)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-2
        eager_out, eager_row = run()
        assert torch.equal(out, eager_out)
        if return_row:
            assert torch.isfinite(row).all() and rel_err(row, ref_row) < 1e-2 and torch.equal(row, eager_row)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unused_buffer_rows_may_hold_nan(backend):
    """Rows no live kept entry points at (stale or uninitialised KV slots, the targets of clamped
    garbage indices past kept_len) must not reach the output, even when they hold NaN."""
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    B, H, Hkv, Q, D, L, K = 3, 4, 2, 2, 16, 40, 19
    q, kb, vb, idx, lens = make_inputs(B, H, Hkv, Q, D, L, K, seed=3)
    ref = naive_gather_attend(q, kb, vb, idx, lens)
    live = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        live[b, idx[b, : int(lens[b])]] = True
    dead = ~live[:, None, :, None].expand_as(kb)
    kb_nan, vb_nan = kb.masked_fill(dead, float("nan")), vb.masked_fill(dead, float("nan"))
    out = gather_attend(q, kb_nan, vb_nan, idx, lens, backend=backend)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("case", REF_CASES)
def test_reference_row_matches_naive(case):
    """return_row: the last query's per-head probabilities over the kept list, beside the output."""
    B, H, Hkv, Q, D, L, K, per_head = case
    q, kb, vb, idx, lens = make_inputs(B, H, Hkv, Q, D, L, K, per_head=per_head, seed=K, lens=[0] + [K] * (B - 1))
    out, row = gather_attend_reference(q, kb, vb, idx, lens, return_row=True)
    assert row.shape == (B, H, K) and row.dtype == torch.float32
    assert torch.equal(out, gather_attend_reference(q, kb, vb, idx, lens))
    torch.testing.assert_close(row.double(), naive_last_row(q, kb, idx, lens), atol=2e-6, rtol=1e-5)

