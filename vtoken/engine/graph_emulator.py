"""A CUDA graph's capture-and-replay semantics on any device: what ``cuda_graph="emulate"`` uses.

``torch.cuda.CUDAGraph`` records the kernels a function launches, with the memory each reads and
writes, and ``replay()`` re-launches exactly those kernels on the same memory: no Python runs. So a
captured closure is right only if everything a replay must recompute is a device operation on
tensors that outlive the capture (the engine's sessions keep them), and anything decided in Python
during the capture (an ``int`` read from a tensor, a host-side branch, a counter in a closure) is
frozen at its captured value. A replay that reads such a frozen value gives wrong tokens with no
error, and only on a GPU, where the tests do not run.

:class:`EmulatedGraph` makes the same contract checkable on the CPU: ``capture(fn)`` runs ``fn`` once
under a dispatch mode that records every ATen operation with its argument tensors (kept alive, as
the graph's memory pool keeps them) and its results; ``replay()`` re-runs the recorded operations in
order on those same tensors, writing each functional op's new result into the tensor the capture
returned, without running any of ``fn``'s Python. Views are not re-run (they alias recorded memory,
as a graph's views do). Reading a device value on the host during the capture raises, as it does in
a CUDA capture (``.item()``, ``nonzero``, ``tolist`` ...). Constants made outside the dispatcher
(``torch.from_numpy``) stay as captured, like a graph's copy from a host buffer. Slow (Python per
operation): for tests, not for speed.

Shapes: whatever ``fn`` uses; nothing is resized on replay (a graph's tensors have fixed shapes).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: ATen ops that read a device value on the host (what the tests count)
SYNC_OPS = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default",
                      "aten.is_nonzero.default"})
#: and the ops whose CUDA kernels size their output from device values (``aten.index.Tensor``
#: counted only with a bool index, ``repeat_interleave`` only without ``output_size``)
SIZE_SYNC_OPS = frozenset({"aten.masked_select.default", "aten._unique2.default", "aten.unique_consecutive.default",
                           "aten.unique_dim.default", "aten.repeat_interleave.Tensor", "aten.index.Tensor"})
#: ``Tensor`` methods that copy to the host
TRANSFER_CALLS = frozenset({"tolist", "numpy", "cpu"})


def waits(name: str, args, kwargs) -> bool:
    """Whether this call of a counted op waits: boolean-mask indexing only with a bool index,
    ``repeat_interleave`` only without ``output_size``."""
    if name == "aten.index.Tensor":
        return len(args) > 1 and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
    if name == "aten.repeat_interleave.Tensor":
        return (kwargs or {}).get("output_size") is None
    return True


class CaptureError(RuntimeError):
    """An operation a CUDA graph capture cannot hold (it reads a device value on the host)."""


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in SYNC_OPS | SIZE_SYNC_OPS and waits(name, args, kwargs):
            raise CaptureError(f"{name} reads a device value on the host: not capturable in a CUDA graph")
        out = func(*args, **kwargs)
        if not func.is_view:  # a view aliases recorded memory: nothing to re-run
            self.ops.append((func, args, kwargs, out))
        return out


class _NoHostCopies(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in TRANSFER_CALLS:
            raise CaptureError(f"Tensor.{func.__name__} copies to the host: not capturable in a CUDA graph")
        return func(*args, **(kwargs or {}))


def _write(recorded, fresh) -> None:
    """Put a re-run's result where the capture's result lives (an in-place op already did)."""
    if isinstance(recorded, torch.Tensor):
        if fresh is not recorded:
            recorded.copy_(fresh)
    elif isinstance(recorded, (list, tuple)):
        for r, f in zip(recorded, fresh):
            _write(r, f)


class EmulatedGraph:
    """``torch.cuda.CUDAGraph``'s contract on any device (see the module docstring)."""

    def __init__(self):
        self.ops: list = []

    def capture(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` once, recording its operations (raises :class:`CaptureError` where a CUDA
        capture would fail)."""
        with _NoHostCopies(), _Recorder(self.ops):
            fn()

    @torch.no_grad()
    def replay(self) -> None:
        """Re-run the recorded operations on the recorded tensors (none of ``fn``'s Python)."""
        for func, args, kwargs, out in self.ops:
            _write(out, func(*args, **kwargs))


def emulated_capture(fn: Callable[[], object], dev=None, warmups: int = 1) -> EmulatedGraph:
    """:func:`vtoken.engine.graphs._capture`'s counterpart: ``warmups`` eager runs, then the capture."""
    for _ in range(warmups):
        fn()
    graph = EmulatedGraph()
    graph.capture(fn)
    return graph
