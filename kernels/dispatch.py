"""Backend choice for vtoken's kernels: Triton where it can run, the PyTorch reference elsewhere.

``backend`` for every public kernel function:

- ``"auto"``   Triton when every tensor is on CUDA and ``triton`` imports; the reference otherwise, and
               also when autograd would need gradients (the Triton kernels are forward-only).
- ``"triton"`` always Triton. Tensors on the CPU need the Triton interpreter (``TRITON_INTERPRET=1``
               set before the first kernel call of the process).
- ``"torch"``  always the PyTorch reference (:mod:`vtoken.kernels.reference`).

Kernels are decorated with ``triton.jit`` lazily, on first use, so the interpreter setting is the one
in force at the first call, not at import time (tests set ``TRITON_INTERPRET`` during collection,
possibly after another module already imported :mod:`vtoken.kernels`).
"""

from __future__ import annotations

import functools
import os

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
            "set TRITON_INTERPRET=1 before the first kernel call"
        )
    return "triton"


_JIT_CACHE: dict = {}


def lazy_jit(fn):
    """Return ``triton.jit(fn)``, built on first use and cached per interpreter mode."""
    key = (fn, interpreter_enabled())
    jitted = _JIT_CACHE.get(key)
    if jitted is None:
        jitted = triton.jit(fn)
        _JIT_CACHE[key] = jitted
    return jitted


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


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
