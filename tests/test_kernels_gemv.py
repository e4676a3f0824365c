"""vtoken.kernels.gemv: the batch-1 matrix-vector kernel against ``F.linear`` computed in float64
(an independent expectation), through Triton's interpreter without CUDA, at a 7B model's sizes on a GPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vtoken.kernels import HAS_TRITON  # noqa: E402
from vtoken.kernels.gemv import gemv, gemv_reference  # noqa: E402

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _exact(x, w, b=None):
    return torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())


def _within_one_rounding(got, want, dtype):
    """|got - want| <= one rounding of the result plus the float32 accumulation's error on |w|·|x|."""
    eps = torch.finfo(dtype).eps
    return (got.double() - want).abs() <= eps * want.abs() + 1e-5 * want.abs().max() + 1e-6


@needs_triton
@pytest.mark.parametrize("N,K,tiles", [(37, 100, (8, 32, 1, 1)), (64, 256, (16, 64, 2, 2)), (5, 33, (4, 16, 1, 1))])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_equals_float64_linear(N, K, tiles, bias):
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(1, 1, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    got = gemv(x, w, b, tiles=tiles, backend="triton")
    assert got.shape == (1, 1, N) and got.dtype == x.dtype
    assert _within_one_rounding(got, _exact(x, w, b), torch.float32).all()


@needs_triton
def test_triton_reads_a_strided_weight_view():
    """The merged-projection buffers hand out views whose row stride exceeds K (padded input width)."""
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(48, 72, generator=g)
    w = buf[8:40, :65]  # rows 8..39, the first 65 of 72 columns: stride (72, 1)
    x = torch.randn(65, generator=g)
    got = gemv(x, w, tiles=(8, 32, 1, 1), backend="triton")
    assert _within_one_rounding(got, _exact(x, w), torch.float32).all()
    wrong = _exact(x, buf[8:40, 1:66])  # a kernel that mixed up the row stride reads shifted columns
    assert not _within_one_rounding(got, wrong, torch.float32).all()


@needs_triton
def test_triton_reads_a_strided_bias():
    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(12, 20, generator=g), torch.randn(20, generator=g)
    b = torch.randn(24, generator=g)[::2]  # stride 2
    got = gemv(x, w, b, tiles=(4, 16, 1, 1), backend="triton")
    assert _within_one_rounding(got, _exact(x, w, b), torch.float32).all()


def test_reference_is_linear_rounded_once():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(20, 50, generator=g).to(torch.bfloat16)
    x = torch.randn(1, 50, generator=g).to(torch.bfloat16)
    assert torch.equal(gemv_reference(x, w), _exact(x, w).float().to(torch.bfloat16))


def test_bad_inputs_are_refused():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 8), w, backend="torch")
    with pytest.raises(ValueError, match="does not match"):
        gemv(torch.randn(1, 7), w, backend="torch")
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(1, 8), w, torch.randn(5), backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,K", [(12288, 4096), (4096, 11008), (32000, 4096)])
def test_bf16_on_gpu_at_7b_sizes(N, K):
    g = torch.Generator().manual_seed(N)
    w = (torch.randn(N, K, generator=g) * 0.02).to("cuda", torch.bfloat16)
    x = torch.randn(1, 1, K, generator=g).to("cuda", torch.bfloat16)
    got = gemv(x, w)
    assert _within_one_rounding(got.cpu(), _exact(x.cpu(), w.cpu()), torch.bfloat16).all()


@needs_triton
def test_skinny_linear_takes_the_kernel_for_one_plain_row_only(monkeypatch):
    """skinny_linear runs the kernel for one row of plain tensors; more rows, a tensor subclass (a
    quantized weight reports a float dtype but is no plain storage) or float64 go to F.linear."""
    from vtoken.kernels import gemv as G

    calls = []
    real = G.gemv
    monkeypatch.setattr(G, "gemv", lambda *a, **k: calls.append(1) or real(*a, **k))

    class Wrapped(torch.Tensor):
        pass

    g = torch.Generator().manual_seed(6)
    w, x = torch.randn(8, 16, generator=g), torch.randn(1, 16, generator=g)
    assert torch.allclose(G.skinny_linear(x, w, backend="triton"), x @ w.T, atol=1e-5) and len(calls) == 1
    for args in ((torch.randn(2, 16, generator=g), w), (x, w.as_subclass(Wrapped)), (x.double(), w.double())):
        assert torch.allclose(G.skinny_linear(*args, backend="triton"), args[0] @ args[1].T, atol=1e-5)
    assert len(calls) == 1


def test_run_linear_keeps_the_module_forward_where_a_hook_would_fire():
    from vtoken.kernels.merged_linear import run_linear

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(1, 4)
    seen = []
    gemm = lambda x, w, b: seen.append("gemm") or torch.nn.functional.linear(x, w, b)  # noqa: E731
    run_linear(lin, x, gemm)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append("hook"))
    try:
        run_linear(lin, x, gemm)
    finally:
        handle.remove()
    own = lin.register_forward_hook(lambda m, i, o: seen.append("own"))
    try:
        run_linear(lin, x, gemm)
    finally:
        own.remove()
    assert seen == ["gemm", "hook", "own"]
