"""varlen_attention and patch_vision_varlen: reference vs a block-diagonal naive softmax, Triton vs the
reference, and a patched tiny Qwen2.5-VL vision tower vs the unpatched one.

Without CUDA the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1) at small
shapes; tests marked ``gpu`` run large shapes on a CUDA device.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vtoken.kernels import (  # noqa: E402
    HAS_TRITON,
    patch_vision_varlen,
    varlen_attention,
    varlen_attention_reference,
)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(lengths, H, D, *, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return q, k, v, cu


def naive_varlen(q, k, v, cu, scale=None):
    """Float64 attention over all tokens with an explicit block-diagonal mask."""
    T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    seg = torch.zeros(T, dtype=torch.long)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        seg[a:b] = s
    same = seg[:, None] == seg[None, :]
    q64, k64, v64 = (x.double().cpu().transpose(0, 1) for x in (q, k, v))  # [H, T, D]
    logits = (q64 @ k64.transpose(-1, -2) * scale).masked_fill(~same, float("-inf"))
    return (torch.softmax(logits, -1) @ v64).transpose(0, 1)


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("lengths,H,D", [([5, 16, 0, 39, 4], 3, 20), ([64, 64, 37, 100], 2, 16), ([1], 4, 8)])
def test_reference_matches_naive(lengths, H, D):
    q, k, v, cu = make_inputs(lengths, H, D, seed=sum(lengths))
    out = varlen_attention_reference(q, k, v, cu)
    torch.testing.assert_close(out.double(), naive_varlen(q, k, v, cu), atol=2e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("lengths,H,D,dtype", [
    ([5, 16, 0, 39, 4], 3, 20, torch.float32),   # empty segment, odd lengths, D not a power of two
    ([33, 17], 2, 16, torch.float16),
])
def test_triton_matches_reference_cpu(lengths, H, D, dtype):
    if torch.cuda.is_available():
        pytest.skip("covered at large shapes by the gpu tests")
    q, k, v, cu = make_inputs(lengths, H, D, dtype=dtype, seed=7)
    out = varlen_attention(q, k, v, cu, backend="triton")
    ref = varlen_attention_reference(q.float(), k.float(), v.float(), cu)
    assert out.dtype == dtype
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 3e-3)


def tiny_qwen25_vision(seed=0, **overrides):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(seed)
    kw = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=24,
              fullatt_block_indexes=[1], patch_size=14, window_size=56, spatial_merge_size=2, temporal_patch_size=2)
    kw.update(overrides)
    cfg = Qwen2_5_VLVisionConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return Qwen2_5_VisionTransformerPretrainedModel(cfg).eval()


def tower_inputs(grid, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n = int(grid.prod(-1).sum())
    return torch.randn(n, 3 * 2 * 14 * 14, generator=g).to(device=device, dtype=dtype), grid.to(device)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_patched_qwen25_vision_tower_matches_unpatched(backend):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the gpu test covers the compiled kernel")
    tower = tiny_qwen25_vision()
    # an image with uneven windows (6 x 8 patches, windows of 4 x 4) and a 2-frame video
    x, grid = tower_inputs(torch.tensor([[1, 6, 8], [2, 4, 4]]))
    with torch.no_grad():
        ref = tower(x, grid_thw=grid)
        remove = patch_vision_varlen(tower, backend=backend)
        with pytest.raises(ValueError, match="already patched"):
            patch_vision_varlen(tower)
        out = tower(x, grid_thw=grid)
        remove()
        again = tower(x, grid_thw=grid)
    assert all("forward" not in m.__dict__ for m in tower.modules())
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.pooler_output, ref.pooler_output, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_patched_tower_runs_under_inference_mode(backend):
    """``torch.inference_mode()`` (what ``vtoken eval`` and many users wrap ``generate`` in): the
    tower's ``cu_seqlens`` are inference tensors, which keep no version counter; the patched
    tower must still run (it failed every pruned Qwen prefill on the GPU) and equal the unpatched."""
    tower = tiny_qwen25_vision()
    x, grid = tower_inputs(torch.tensor([[1, 6, 8], [2, 4, 4]]))
    with torch.inference_mode():
        ref = tower(x, grid_thw=grid)
        remove = patch_vision_varlen(tower, backend=backend)
        try:
            outs = [tower(x, grid_thw=grid) for _ in range(2)]  # the second forward: new cu_seqlens
        finally:
            remove()
    for out in outs:
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_patch_rejects_a_model_without_vision_attention():
    with pytest.raises(ValueError, match="no windowed vision attention"):
        patch_vision_varlen(torch.nn.Linear(3, 3))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lengths,H,D", [([64] * 200 + [37, 16], 16, 80), ([1024] * 6 + [517], 16, 80),
                                         ([4096, 3001], 8, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_reference_gpu(lengths, H, D, dtype):
    q, k, v, cu = make_inputs(lengths, H, D, dtype=dtype, device="cuda", seed=len(lengths))
    out = varlen_attention(q, k, v, cu)
    ref = varlen_attention_reference(q.float(), k.float(), v.float(), cu)
    assert rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("width", [512, 500])  # an MLP width that is not a multiple of 8 gets padded to 504
def test_patched_qwen25_vision_tower_matches_unpatched_gpu(width):
    """bf16 on CUDA: the varlen attention and the fused parts (rotary, norms, padded MLP), each
    passing its check, give the unpatched tower's output within bf16 rounding."""
    tower = tiny_qwen25_vision(depth=4, hidden_size=256, num_heads=4, intermediate_size=width,
                               fullatt_block_indexes=[1, 3], window_size=112).cuda().to(torch.bfloat16)
    x, grid = tower_inputs(torch.tensor([[1, 30, 42], [4, 16, 16]]), dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        ref = tower(x, grid_thw=grid)
        remove = patch_vision_varlen(tower)
        out = tower(x, grid_thw=grid)
        remove()
    assert len(remove.fused_verdicts) == 3 and all(remove.fused_verdicts.values()), remove.fused_verdicts
    assert rel_err(out.pooler_output, ref.pooler_output) < 2e-2


@pytest.mark.parametrize("lengths", [[5, 16, 0, 39, 4], [57]])
def test_reference_takes_host_bounds(lengths):
    """The per-segment SDPA reference given the host copy of cu_seqlens (what the long-segment path
    runs with cuDNN on a GPU), on the CPU's SDPA: equal to the naive softmax over several segments
    (an empty one among them) and over one."""
    from vtoken.kernels.reference import varlen_attention_torch

    q, k, v, cu = make_inputs(lengths, 3, 20, seed=3)
    out = varlen_attention_torch(q, k, v, tuple(cu.tolist()), 0.3)
    torch.testing.assert_close(out.double(), naive_varlen(q, k, v, cu, scale=0.3), atol=2e-6, rtol=1e-5)


def test_probe_takes_a_rounded_attention_and_refuses_a_wrong_one():
    """The one-time check of cuDNN's first output (kernels/varlen.py, _probe_agrees), on the CPU:
    the float32 answer rounded to bf16 passes; heads swapped, or the scale forgotten, do not."""
    from vtoken.kernels.reference import varlen_attention_torch
    from vtoken.kernels.varlen import _probe_agrees

    segment_sdpa = lambda q, k, v, bounds, scale=None: varlen_attention_torch(q, k, v, bounds, scale)  # noqa: E731
    q, k, v, cu = make_inputs([300, 212], 4, 16, seed=5)
    bounds = tuple(cu.tolist())
    out = segment_sdpa(q, k, v, bounds)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    assert _probe_agrees(qb, kb, vb, segment_sdpa(qb.float(), kb.float(), vb.float(), bounds).bfloat16(), bounds, None)
    assert not _probe_agrees(qb, kb, vb, out.flip(1).bfloat16(), bounds, None)
    assert not _probe_agrees(qb, kb, vb, segment_sdpa(q, k, v, bounds, scale=1.0).bfloat16(), bounds, None)


def test_long_segment_attention_declines_where_cudnn_does_not_run():
    """Off CUDA, in float32, or with gradients needed: None, so the caller runs varlen_attention."""
    from vtoken.kernels.varlen import long_segment_attention

    q, k, v, cu = make_inputs([8, 8], 2, 16)
    assert long_segment_attention(q, k, v, tuple(cu.tolist())) is None
    assert long_segment_attention(q.half(), k.half(), v.half(), tuple(cu.tolist())) is None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lengths", [[8192], [4096, 5000]])
def test_long_segment_attention_matches_reference_gpu(lengths):
    """cuDNN's fused attention per long segment (Qwen2.5-VL's full-attention blocks: 16 heads of 80),
    bf16, against the float32 reference; None only where this torch has no cuDNN attention."""
    from vtoken.kernels.varlen import long_segment_attention

    from vtoken.kernels.varlen import _cuda_runtime_at_least

    if torch.backends.cudnn.version() is None or not _cuda_runtime_at_least(12, 9):
        pytest.skip("no cuDNN, or a CUDA runtime before 12.9 (where the tower keeps varlen_attention)")
    q, k, v, cu = make_inputs(lengths, 16, 80, dtype=torch.bfloat16, device="cuda", seed=len(lengths))
    out = long_segment_attention(q, k, v, tuple(cu.tolist()))
    assert out is not None, "cuDNN attention refused or disagreed with its probe (the tower then uses varlen)"
    ref = varlen_attention_reference(q.float(), k.float(), v.float(), cu)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_patched_tower_sends_long_full_attention_segments_to_cudnn_gpu(monkeypatch):
    """A Qwen2.5-VL tower on one large image: its full-attention blocks (one segment of 4,096+ patches)
    go through long_segment_attention, its windowed blocks through varlen; output within bf16
    rounding of the unpatched tower's."""
    from vtoken.kernels import vision_patch

    calls = []
    real = vision_patch.long_segment_attention

    def counted(q, *a, **kw):
        out = real(q, *a, **kw)
        calls.append((q.shape[0], out is not None))  # (segment rows, whether cuDNN's kernel ran)
        return out
    monkeypatch.setattr(vision_patch, "long_segment_attention", counted)
    tower = tiny_qwen25_vision(depth=4, hidden_size=256, num_heads=4, intermediate_size=512,
                               fullatt_block_indexes=[1, 3], window_size=112).cuda().to(torch.bfloat16)
    x, grid = tower_inputs(torch.tensor([[1, 64, 80]]), dtype=torch.bfloat16, device="cuda")  # 5,120 patches
    with torch.no_grad():
        ref = tower(x, grid_thw=grid)
        remove = patch_vision_varlen(tower)
        out = tower(x, grid_thw=grid)
        remove()
    assert calls == [(5120, True), (5120, True)]  # the two full-attention blocks only, through cuDNN
    assert rel_err(out.pooler_output, ref.pooler_output) < 2e-2


@needs_triton
def test_patched_tower_routes_only_long_full_attention_segments(monkeypatch):
    """The dispatch on the CPU (Triton's interpreter for varlen; the long-segment path stood in for by
    SDPA per segment, which is what cuDNN computes): with the threshold at 128 patches, a 256-patch
    image's two full-attention blocks take the long path, its 64-patch windows never do, a second
    image below the threshold sends nothing there, and the tower's output is the unpatched one's."""
    if torch.cuda.is_available():
        pytest.skip("the gpu test covers cuDNN")
    from vtoken.kernels import vision_patch
    from vtoken.kernels.reference import varlen_attention_torch

    calls = []
    monkeypatch.setattr(vision_patch, "LONG_SEGMENT", 128)
    monkeypatch.setattr(vision_patch, "long_segment_attention",
                        lambda q, k, v, bounds, scale=None: calls.append(bounds) or varlen_attention_torch(q, k, v, bounds, scale))
    tower = tiny_qwen25_vision(depth=4, fullatt_block_indexes=[1, 3], window_size=112)
    for grid, want_calls in (([[1, 16, 16]], [(0, 256), (0, 256)]), ([[1, 16, 16], [1, 8, 8]], [])):
        calls.clear()
        x, thw = tower_inputs(torch.tensor(grid))
        with torch.no_grad():
            ref = tower(x, grid_thw=thw)
            remove = patch_vision_varlen(tower, backend="triton", fused_ops=False)
            out = tower(x, grid_thw=thw)
            remove()
        assert calls == want_calls
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)
