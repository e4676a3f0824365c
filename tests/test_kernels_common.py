"""What the three kernels share: lazily jitted device functions (kernels/triton_helpers.py), the
references derived from the kernel functions, the argument and dtype checks, and bf16 on the CPU.

Without CUDA the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py): it has to be set before triton is imported (triton's own ``tl.zeros`` etc. are jitted
at its import).
"""

import importlib
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vtoken.kernels as K
from vtoken.kernels.dispatch import interpreter_enabled, lazy_jit, tl

needs_triton = pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
cpu_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")

_ga = importlib.import_module("vtoken.kernels.gather_attend")
_helpers = importlib.import_module("vtoken.kernels.triton_helpers")


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(kernel, dtype, seed=0):
    """Small random inputs (never zeros) for one kernel: (positional args, keyword args)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if kernel == "attend_and_score":
        kpm = torch.ones(2, 29, dtype=torch.bool)
        kpm[1, :4] = False
        return (rnd(2, 8, 29, 16), rnd(2, 2, 29, 16), rnd(2, 2, 29, 16)), dict(
            score_rows=torch.tensor([[28, 3, -1], [28, 10, 0]]), key_start=1, key_end=27, key_padding_mask=kpm)
    if kernel == "gather_attend":
        idx = torch.stack([torch.randperm(40, generator=g)[:21].sort().values for _ in range(2)])
        return (rnd(2, 8, 2, 16), rnd(2, 2, 40, 16), rnd(2, 2, 40, 16), idx, torch.tensor([21, 9])), {}
    return (rnd(30, 2, 16), rnd(30, 2, 16), rnd(30, 2, 16), torch.tensor([0, 7, 7, 30])), {}


KERNELS = {name: (getattr(K, name), getattr(K, f"{name}_reference"))
           for name in ("attend_and_score", "gather_attend", "varlen_attention")}


# ---------------------------------------------------------------- references derived from the kernels


def test_references_are_the_kernels_with_the_torch_backend():
    for name, (kernel, reference) in KERNELS.items():
        params = inspect.signature(reference).parameters
        assert "backend" not in params and reference.__name__ == f"{name}_reference"
        assert set(params) <= set(inspect.signature(kernel).parameters)
        args, kw = _inputs(name, torch.float32)
        got, want = reference(*args, **kw), kernel(*args, **kw, backend="torch")
        for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, want))):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        with pytest.raises(TypeError):
            reference(*args, **kw, backend="torch")
    q, kb, vb, idx, lens = _inputs("gather_attend", torch.float32)[0]
    with pytest.raises(TypeError, match="num_splits"):  # Triton-only tuning arguments are not the reference's
        K.gather_attend_reference(q, kb, vb, idx, lens, num_splits=2)


def test_reference_takes_any_float_dtype_and_triton_its_three():
    """The fp16/bf16/fp32 rule is the Triton kernels' own: the torch path also computes in float64."""
    for name, (kernel, reference) in KERNELS.items():
        args, kw = _inputs(name, torch.float64)
        out = reference(*args, **kw)
        assert (out[0] if isinstance(out, tuple) else out).dtype == torch.float64
        if K.HAS_TRITON and interpreter_enabled() and not torch.cuda.is_available():
            with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
                kernel(*args, **kw, backend="triton")
    if K.HAS_TRITON and interpreter_enabled() and not torch.cuda.is_available():
        (q, k, v), kw = _inputs("attend_and_score", torch.float32)
        with pytest.raises(TypeError, match="share a dtype"):
            K.attend_and_score(q, k.half(), v.half(), **kw, backend="triton")


# ---------------------------------------------------------------- device functions: jitted with their kernel


@needs_triton
@cpu_interpreter
def test_helpers_are_jitted_with_each_kernel_and_modules_keep_plain_functions():
    from triton.runtime.interpreter import InterpretedFunction

    kernel = lazy_jit(_ga._split_kernel)
    assert lazy_jit(_ga._split_kernel) is kernel  # cached per interpreter mode
    bound = kernel.fn.__globals__
    for name in ("attend_block", "dot_qk", "normalize_rows"):
        assert isinstance(bound[name], InterpretedFunction), name
        assert getattr(_ga, name) is getattr(_helpers, name) and inspect.isfunction(getattr(_ga, name))
    # helpers that call helpers get theirs bound too
    assert isinstance(bound["attend_block"].fn.__globals__["softmax_step"], InterpretedFunction)
    assert _ga.__dict__ is not bound and "softmax_step" not in _ga.__dict__


_COMPILED_CODEGEN = r"""
import importlib
import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from vtoken.kernels.dispatch import lazy_jit

A, G, V = (importlib.import_module("vtoken.kernels." + m) for m in ("attend_and_score", "gather_attend", "varlen"))
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
options = backend.parse_options({"num_warps": 4})
FLOATS = {"qk_scale", "inv_h"}

def ttir(fn, ptrs, constexprs):
    jf = lazy_jit(fn)
    assert isinstance(jf, triton.runtime.JITFunction)
    sig = {n: "constexpr" if n in constexprs else ptrs.get(n, "fp32" if n in FLOATS else "i32") for n in jf.arg_names}
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    mod = ASTSource(jf, sig, constexprs).make_ir(target, options, backend.get_codegen_implementation(options),
                                                 backend.get_module_map(), ctx)
    return str(mod)

for dt, ieee in (("fp16", False), ("fp32", True)):
    p = "*" + dt
    mods = [
        ttir(A._flash_fwd_kernel, dict(Q=p, K=p, V=p, O=p, LSE="*fp32", KPM="*u8"),
             dict(HAS_MASK=True, IEEE=ieee, HEAD_DIM=80, BLOCK_D=128, BLOCK_M=64, BLOCK_N=32)),
        ttir(A._score_kernel, dict(Q=p, K=p, LSE="*fp32", KPM="*u8", ROWS="*i64", S="*fp32"),
             dict(HAS_MASK=False, AVERAGE=True, IEEE=ieee, HEAD_DIM=64, BLOCK_D=64, BLOCK_R=16, BLOCK_N=64)),
        ttir(G._split_kernel, dict(Q=p, KB=p, VB=p, IDX="*i32", KLEN="*i32", O=p, PACC="*fp32", PML="*fp32",
                                   ROW="*fp32", LSE="*fp32"),
             dict(NUM_SPLITS=2, IEEE=ieee, WANT_ROW=True, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=64)),
        ttir(G._split_kernel, dict(Q=p, KB=p, VB=p, IDX="*i32", KLEN="*i32", O=p, PACC=p, PML=p, ROW=p, LSE=p),
             dict(NUM_SPLITS=1, IEEE=ieee, WANT_ROW=False, HEAD_DIM=64, BLOCK_D=64, BLOCK_M=16, BLOCK_N=64)),
        ttir(V._varlen_kernel, dict(Q=p, K=p, V=p, O=p, CU="*i32"),
             dict(IEEE=ieee, HEAD_DIM=80, D1=64, D2=16, BLOCK_M=64, BLOCK_N=64)),
    ]
    for m in mods:
        assert "tt.dot" in m and "dot_qk" in m, m[:2000]  # the helper, called and compiled
print("ok")
"""


@needs_triton
def test_kernels_and_helpers_generate_gpu_ir_without_a_gpu():
    """Compiled mode (no interpreter): each kernel, helpers included, lowers to Triton IR for sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILED_CODEGEN], env=env, capture_output=True, text=True,
                         timeout=300)
    if res.returncode and ("ImportError" in res.stderr or "ModuleNotFoundError" in res.stderr):
        pytest.skip(f"this triton build cannot lower for CUDA here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-4000:]


def test_kernels_import_and_fall_back_without_triton():
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        import vtoken.kernels as K
        import vtoken.kernels.triton_helpers
        assert not K.HAS_TRITON
        q, kb = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 5, 8)
        out = K.gather_attend(q, kb, kb, torch.tensor([[0, 2, 4]]), torch.tensor([3]))
        assert out.shape == (1, 2, 1, 8) and torch.isfinite(out).all()
        try:
            K.gather_attend(q, kb, kb, torch.tensor([[0, 2, 4]]), torch.tensor([3]), backend="triton")
        except RuntimeError as e:
            assert "not installed" in str(e)
        else:
            raise AssertionError("backend='triton' without triton must fail")
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-4000:]


# ---------------------------------------------------------------- bf16 on the interpreter


def _bf16_dot_probe(A, B, C, N: tl.constexpr):
    offs = tl.arange(0, N)
    tile = offs[:, None] * N + offs[None, :]
    tl.store(C + tile, tl.dot(tl.load(A + tile), tl.load(B + tile)))


def interpreter_bf16_dot_ok() -> bool:
    """Whether this Triton's interpreter computes a bf16 ``tl.dot`` right (3.9's does not)."""
    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    c = torch.empty(16, 16)
    lazy_jit(_bf16_dot_probe)[(1,)](a, b, c, N=16)
    return rel_err(c, a.float() @ b.float()) < 1e-3


@needs_triton
@cpu_interpreter
@pytest.mark.parametrize("name", list(KERNELS))
def test_triton_bf16_matches_reference_cpu(name):
    if not interpreter_bf16_dot_ok():
        pytest.skip("this Triton interpreter computes bf16 tl.dot wrongly; bf16 runs in the gpu tests")
    kernel, reference = KERNELS[name]
    args, kw = _inputs(name, torch.bfloat16, seed=3)
    got = kernel(*args, **kw, backend="triton")
    want = reference(*(a.float() if a.is_floating_point() else a for a in args), **kw)
    for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, want))):
        assert rel_err(a, b) <= 1e-2
