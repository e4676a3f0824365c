"""Backend choice for vtoken's kernels: Triton where it can run, the PyTorch reference elsewhere.

``backend`` for every public kernel function:

- ``"auto"``   Triton when every tensor is on CUDA and ``triton`` imports; the reference otherwise, and
               also when autograd would need gradients (the Triton kernels are forward-only).
- ``"triton"`` always Triton. Tensors on the CPU need the Triton interpreter (``TRITON_INTERPRET=1``
               set before triton is imported, i.e. before importing :mod:`vtoken.kernels`).
- ``"torch"``  always the PyTorch reference (:mod:`vtoken.kernels.reference`).

Kernels are decorated with ``triton.jit`` lazily, on first use, in the interpreter mode in force at
that call, and the device functions they call (:mod:`vtoken.kernels.triton_helpers`, marked with
:func:`jit_helper`) are jitted along with them, so defining and importing the kernels needs no triton.
The interpreter itself must be switched on before triton is imported: triton 3.x jits its own library
functions (``tl.zeros``, ...) at its import (the tests' conftest.py sets it first thing).
"""

from __future__ import annotations

import functools
import inspect
import os
import types
from typing import Callable

import torch

try:  # triton is an optional dependency (``pip install vtoken[triton]``)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None

    class _LanguageStub:  # lets kernel signatures (``x: tl.constexpr``) be defined without triton
        constexpr = None

    tl = _LanguageStub()
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for ``backend`` and the tensors a kernel will read.

    Raises ``ValueError`` for an unknown backend name and ``RuntimeError`` when ``"triton"`` is forced
    where it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors if t is not None)
        return "triton" if (HAS_TRITON and on_cuda and not needs_grad) else "torch"
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' was requested but triton is not installed (pip install triton)")
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in tensors if t is not None})
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {devices}) or the Triton interpreter: "
            "set TRITON_INTERPRET=1 before triton is imported"
        )
    return "triton"


_JIT_CACHE: dict = {}
_HELPER_MARK = "_vtoken_jit_helper"


def jit_helper(fn):
    """Mark ``fn`` as a Triton device function for kernels to call; :func:`lazy_jit` jits it with them."""
    setattr(fn, _HELPER_MARK, True)
    return fn


def lazy_jit(fn):
    """Return ``triton.jit(fn)``, built on first use and cached per interpreter mode.

    The :func:`jit_helper` functions ``fn`` calls by global name are jitted the same way, for the same
    mode: ``fn`` is jitted as a copy whose globals bind those names to the jitted helpers. The module
    that defines ``fn`` keeps the plain functions, so compiled and interpreted kernels can coexist.
    """
    key = (fn, interpreter_enabled())
    jitted = _JIT_CACHE.get(key)
    if jitted is None:
        jitted = triton.jit(_bind_helpers(fn))
        _JIT_CACHE[key] = jitted
    return jitted


def _bind_helpers(fn):
    scope = fn.__globals__
    helpers = {name: scope[name] for name in fn.__code__.co_names if getattr(scope.get(name), _HELPER_MARK, False)}
    if not helpers:
        return fn
    bound = types.FunctionType(fn.__code__, {**scope, **{n: lazy_jit(h) for n, h in helpers.items()}},
                               fn.__name__, fn.__defaults__, fn.__closure__)
    for attr in ("__kwdefaults__", "__qualname__", "__module__", "__doc__"):
        setattr(bound, attr, getattr(fn, attr))
    bound.__annotations__ = dict(fn.__annotations__)  # tl.constexpr parameters
    return bound


def torch_reference(kernel: Callable, *triton_only: str) -> Callable:
    """The PyTorch reference of a public kernel function: ``kernel`` with ``backend="torch"``.

    Same arguments, checks and results, minus ``backend`` and the Triton-only tuning arguments
    ``triton_only`` (passing one is a ``TypeError``, as for any unknown argument).
    """
    sig = inspect.signature(kernel)
    drop = {"backend", *triton_only}
    ref_sig = sig.replace(parameters=[p for name, p in sig.parameters.items() if name not in drop])

    def reference(*args, **kwargs):
        bound = ref_sig.bind(*args, **kwargs)
        return kernel(*bound.args, **bound.kwargs, backend="torch")

    reference.__name__ = reference.__qualname__ = f"{kernel.__name__}_reference"
    reference.__module__ = kernel.__module__
    reference.__signature__ = ref_sig
    reference.__doc__ = (
        f"PyTorch reference of :func:`{kernel.__name__}`: that function with ``backend=\"torch\"`` "
        f"(stock PyTorch ops, any device); see its docstring."
    )
    return reference


def kernel_launcher(cache: dict, kernel, configs, key: list[str], *, tune: bool = True,
                    tile_names: tuple = ("BLOCK_M", "BLOCK_N")):
    """``(mode, fn)``: the jitted ``kernel`` and how to launch it, built once per mode into ``cache``.

    ``"interp"``: the CPU interpreter (the caller picks small tiles); ``"tuned"``: autotuned over
    ``configs`` (``(tile_a, tile_b, num_warps, num_stages)`` tuples, the tiles passed as the
    constexprs ``tile_names``, default ``BLOCK_M`` / ``BLOCK_N``) on ``key``, when ``tune`` and not
    ``VTOKEN_KERNELS_AUTOTUNE=0``; ``"fixed"``: the caller passes its tiles (no autotuning, e.g. to keep
    test compiles short).
    """
    if interpreter_enabled():
        mode = "interp"
    elif tune and os.environ.get("VTOKEN_KERNELS_AUTOTUNE", "1") != "0":
        mode = "tuned"
    else:
        mode = "fixed"
    fn = cache.get(mode)
    if fn is None:
        fn = lazy_jit(kernel)
        if mode == "tuned":
            tiles = [triton.Config(dict(zip(tile_names, (a, b))), num_warps=w, num_stages=st)
                     for a, b, w, st in configs]
            fn = triton.autotune(tiles, key=key)(fn)
        cache[mode] = fn
    return mode, fn


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (used to size split-K grids)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    """SM count for ``t``'s device; a small fixed number on the CPU interpreter."""
    if t.is_cuda:
        return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 4


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host code (``triton.cdiv`` is a jit function: ~20 µs a call from Python)."""
    return -(-int(a) // int(b))


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


#: what the messages of a device that ran out say (CUDA's allocator, cuBLAS / cuSOLVER workspaces,
#: an asynchronous CUDA error surfacing in a later call)
_DEVICE_FAILURE_MARKERS = ("out of memory", "CUSOLVER_STATUS_", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA error")


def is_device_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out or failed (torch's ``OutOfMemoryError`` /
    ``AcceleratorError``, or a message of CUDA's allocator, cuBLAS, cuSOLVER or CUDA itself), not that
    a call cannot be served: a kernel must not take it for a refusal and turn itself off
    (``long_segment_attention``), nor ``vtoken eval`` score it as a method's failure."""
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None)) if k)
    return isinstance(exc, kinds) or any(m in str(exc) for m in _DEVICE_FAILURE_MARKERS)
