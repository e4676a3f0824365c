"""attend_and_score: the reference against a naive eager softmax, Triton against the reference.

Without CUDA the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1) at small
shapes; tests marked ``gpu`` run large shapes in bf16/fp16/fp32 on a CUDA device.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vtoken.kernels import HAS_TRITON, attend_and_score, attend_and_score_reference  # noqa: E402
from vtoken.kernels import reference as ref_mod  # noqa: E402

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(B, H, Hkv, N, D, *, pad=None, dtype=torch.float32, device="cpu", seed=0):
    """Fresh random q/k/v (never zeros) and a padding mask: pad = None | 'left' | 'right'."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(device=device, dtype=dtype)
    kpm = None
    if pad is not None:
        kpm = torch.ones(B, N, dtype=torch.bool)
        for b in range(B):
            n_pad = (b * 7 + 3) % max(1, N // 2)  # different per sample, sample 0 pads 3
            if pad == "left":
                kpm[b, :n_pad] = False
            else:
                kpm[b, N - n_pad:] = False
        kpm = kpm.to(device)
    return q, k, v, kpm


def make_rows(B, N, R, kpm=None, seed=0):
    """[B, R] rows: each sample's last real token first, then random rows, some slots -1."""
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.randint(0, N, (B, R), generator=g)
    for b in range(B):
        last = N - 1
        if kpm is not None:
            real = torch.nonzero(kpm[b].cpu()).flatten()
            last = int(real[-1]) if len(real) else 0
        rows[b, 0] = last
        if R > 2:
            rows[b, -1] = -1
    return rows


def naive_attention(q, k, v, kpm, scale=None):
    """Float64 eager attention with an explicit N x N softmax (causal + padding); returns (out, probs)."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    q64, k64, v64 = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    logits = (q64 @ k64.transpose(-1, -2)) * scale
    ar = torch.arange(N, device=q.device)
    see = (ar[None, :] <= ar[:, None])[None, None]
    if kpm is not None:
        see = see & kpm[:, None, None, :]
    logits = logits.masked_fill(~see, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs @ v64, probs


def expected_scores(probs, rows, key_start, key_end, average_heads):
    B, H, N, _ = probs.shape
    R = rows.shape[1]
    out = torch.zeros(B, H, R, key_end - key_start, dtype=torch.float64, device=probs.device)
    for b in range(B):
        for r in range(R):
            i = int(rows[b, r])
            if 0 <= i < N:
                out[b, :, r] = probs[b, :, i, key_start:key_end]
    return out.mean(1) if average_heads else out


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- reference vs naive eager softmax

REF_CASES = [
    # B, H, Hkv, N, D
    (2, 4, 4, 37, 16),   # G = 1
    (2, 8, 2, 100, 32),  # G = 4
    (1, 7, 1, 37, 8),    # G = 7
    (3, 4, 1, 64, 16),
]


@pytest.mark.parametrize("shape", REF_CASES)
@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("average_heads", [True, False])
def test_reference_matches_naive(shape, pad, average_heads):
    B, H, Hkv, N, D = shape
    q, k, v, kpm = make_inputs(B, H, Hkv, N, D, pad=pad, seed=hash((shape, pad)) % 1000)
    rows = make_rows(B, N, 5, kpm)
    ks, ke = 3, N - 4
    out, scores = attend_and_score_reference(q, k, v, score_rows=rows, key_start=ks, key_end=ke,
                                             key_padding_mask=kpm, average_heads=average_heads)
    out_n, probs = naive_attention(q, k, v, kpm)
    torch.testing.assert_close(out.double(), out_n, atol=2e-5, rtol=1e-5)
    exp = expected_scores(probs, rows, ks, ke, average_heads)
    assert scores.dtype == torch.float32 and scores.shape == exp.shape
    torch.testing.assert_close(scores.double(), exp, atol=1e-6, rtol=1e-5)


def test_reference_chunked_paths_match(monkeypatch):
    """Row chunking (SDPA with a padding mask, and the probability blocks) gives the same result."""
    q, k, v, kpm = make_inputs(2, 4, 2, 53, 16, pad="left", seed=11)
    rows = make_rows(2, 53, 9, kpm)
    full = attend_and_score_reference(q, k, v, score_rows=rows, key_padding_mask=kpm)
    monkeypatch.setattr(ref_mod, "_SDPA_ROW_CHUNK", 7)
    monkeypatch.setattr(ref_mod, "_SCORE_CHUNK_ELEMS", 2 * 4 * 53 * 2)
    chunked = attend_and_score_reference(q, k, v, score_rows=rows, key_padding_mask=kpm)
    torch.testing.assert_close(chunked[0], full[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked[1], full[1], atol=1e-7, rtol=1e-6)


def test_reference_rows_sum_to_one_and_unused_rows_zero():
    q, k, v, kpm = make_inputs(2, 4, 2, 30, 16, pad="right", seed=5)
    rows = torch.tensor([[29, 0, -1, 40], [12, 5, 7, -1]])
    _, scores = attend_and_score_reference(q, k, v, score_rows=rows, key_padding_mask=kpm)
    sums = scores.sum(-1)
    assert torch.allclose(sums[0, :2], torch.ones(2)) and torch.allclose(sums[1, :3], torch.ones(3))
    assert scores[0, 2:].abs().max() == 0 and scores[1, 3].abs().max() == 0


def test_fully_masked_rows_are_finite_zeros():
    q, k, v, _ = make_inputs(2, 2, 1, 12, 8, seed=3)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[0, :5] = False  # left padding: rows 0..4 of sample 0 see no real key
    out, scores = attend_and_score_reference(q, k, v, score_rows=torch.tensor([[2, 11], [0, 11]]),
                                             key_padding_mask=kpm)
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    assert out[0, :, :5].abs().max() == 0 and scores[0, 0].abs().max() == 0


def test_backend_choice(monkeypatch):
    from vtoken.kernels import resolve_backend

    x = torch.randn(1)
    assert resolve_backend("torch", x) == "torch"
    if not torch.cuda.is_available():
        assert resolve_backend("auto", x) == "torch"
        if HAS_TRITON:
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                resolve_backend("triton", x)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", x)


def test_shape_errors_say_what_was_given():
    q, k, v, _ = make_inputs(1, 6, 4, 8, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attend_and_score(q, k, v, score_rows=None, backend="torch")
    q, k, v, _ = make_inputs(1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="key_end"):
        attend_and_score(q, k, v, score_rows=None, key_start=2, key_end=9, backend="torch")


# ---------------------------------------------------------------- Triton (interpreter on CPU)

TRITON_CPU_CASES = [
    # B, H, Hkv, N, D, pad, dtype
    (2, 2, 2, 37, 16, None, torch.float32),     # G = 1, odd length
    (1, 4, 1, 37, 16, "left", torch.float32),   # G = 4
    (1, 7, 1, 23, 16, "right", torch.float32),  # G = 7
    (2, 2, 1, 50, 32, "left", torch.float16),
    (1, 8, 2, 67, 24, "right", torch.float16),  # G = 4, several query tiles, D = 24, per-head scores
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CPU_CASES)
def test_triton_matches_reference_cpu(case):
    B, H, Hkv, N, D, pad, dtype = case
    if torch.cuda.is_available():
        pytest.skip("covered at large shapes by the gpu tests")
    q, k, v, kpm = make_inputs(B, H, Hkv, N, D, pad=pad, dtype=dtype, seed=N + H)
    rows = make_rows(B, N, 3, kpm)
    avg = dtype == torch.float32
    out, scores = attend_and_score(q, k, v, score_rows=rows, key_start=2, key_end=N - 1, key_padding_mask=kpm,
                                   average_heads=avg, backend="triton")
    out_r, scores_r = attend_and_score_reference(q.float(), k.float(), v.float(), score_rows=rows, key_start=2,
                                                 key_end=N - 1, key_padding_mask=kpm, average_heads=avg)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert rel_err(out, out_r) < tol
    assert rel_err(scores, scores_r) < tol
    torch.testing.assert_close(scores, scores_r, atol=tol, rtol=tol)


@needs_triton
def test_triton_no_rows_and_fully_masked_cpu():
    if torch.cuda.is_available():
        pytest.skip("cpu interpreter test")
    q, k, v, _ = make_inputs(1, 2, 1, 20, 16, seed=9)
    kpm = torch.ones(1, 20, dtype=torch.bool)
    kpm[0, :6] = False
    out, none = attend_and_score(q, k, v, score_rows=None, key_padding_mask=kpm, backend="triton")
    assert none is None and torch.isfinite(out).all() and out[0, :, :6].abs().max() == 0
    out_r, _ = attend_and_score_reference(q, k, v, score_rows=None, key_padding_mask=kpm)
    assert rel_err(out, out_r) < 1e-5


# ---------------------------------------------------------------- GPU, large shapes

GPU_CASES = [
    # B, H, Hkv, N, D, pad, dtype
    (2, 8, 8, 1000, 128, None, torch.bfloat16),
    (2, 16, 4, 1037, 128, "left", torch.bfloat16),
    (1, 28, 4, 2100, 128, "right", torch.bfloat16),  # Qwen2.5-VL-7B heads, G = 7
    (2, 8, 2, 4096, 64, "left", torch.bfloat16),
    (2, 14, 2, 1537, 128, "left", torch.float16),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("average_heads", [True, False])
def test_triton_matches_reference_gpu(case, average_heads):
    B, H, Hkv, N, D, pad, dtype = case
    q, k, v, kpm = make_inputs(B, H, Hkv, N, D, pad=pad, dtype=dtype, device="cuda", seed=N)
    rows = make_rows(B, N, 40, kpm).cuda()
    out, scores = attend_and_score(q, k, v, score_rows=rows, key_start=17, key_end=N - 5, key_padding_mask=kpm,
                                   average_heads=average_heads)
    out_r, scores_r = attend_and_score_reference(q.float(), k.float(), v.float(), score_rows=rows, key_start=17,
                                                 key_end=N - 5, key_padding_mask=kpm, average_heads=average_heads)
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    assert rel_err(out, out_r) <= 1e-2
    assert rel_err(scores, scores_r) <= 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pad", [None, "left"])
def test_triton_fp32_tight_gpu(pad):
    q, k, v, kpm = make_inputs(2, 8, 2, 333, 64, pad=pad, device="cuda", seed=2)
    rows = make_rows(2, 333, 16, kpm).cuda()
    out, scores = attend_and_score(q, k, v, score_rows=rows, key_padding_mask=kpm)
    out_n, probs = naive_attention(q, k, v, kpm)
    assert rel_err(out, out_n) < 1e-5
    assert rel_err(scores, expected_scores(probs, rows, 0, 333, True)) < 1e-5


@pytest.mark.gpu
@needs_cuda
def test_triton_matches_sdpa_flash_gpu():
    """The output is the layer's attention output: same as SDPA with is_causal (no mask)."""
    q, k, v, _ = make_inputs(2, 16, 16, 2048, 128, dtype=torch.bfloat16, device="cuda", seed=4)
    out, _ = attend_and_score(q, k, v, score_rows=None)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(out, sdpa) < 1e-2
