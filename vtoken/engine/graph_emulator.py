"""A CUDA graph's capture-and-replay semantics on any device: what ``cuda_graph="emulate"`` uses.

``torch.cuda.CUDAGraph`` records the kernels a function launches, with the memory each reads and
writes, and ``replay()`` re-launches exactly those kernels on the same memory: no Python runs. So a
captured closure is right only if everything a replay must recompute is a device operation on
tensors that outlive the capture (the engine's sessions keep them), and anything decided in Python
during the capture (an ``int`` read from a tensor, a host-side branch, a counter in a closure) is
frozen at its captured value. A replay that reads such a frozen value gives wrong tokens with no
error, and only on a GPU, where the tests do not run.

:class:`EmulatedGraph` makes the same contract checkable on the CPU: ``capture(fn)`` runs ``fn`` once
under a dispatch mode that records every operation on device tensors with its argument tensors
(kept alive, as the graph's memory pool keeps them) and its results; ``replay()`` re-runs the
recorded operations in order on those same tensors, writing each functional op's new result into the
tensor the capture returned, without running any of ``fn``'s Python. Views are not re-run (they alias
recorded memory, as a graph's views do). Work on tensors that stand for host memory (the caller's
host copies and what is computed from them alone: :class:`_Host`) runs at the capture only, as a
graph holds no CPU work. Reading a device value on the host during the capture raises, as it does in
a CUDA capture (``.item()``, ``nonzero``, ``tolist`` ...), and so does a copy from host memory to a
named device (pageable memory, which a capture refuses). Constants made outside the dispatcher
(``torch.from_numpy``) stay as captured. Unlike CUDA, it keeps every tensor a capture read alive (a
graph reading memory that its owner later frees goes unnoticed). Slow (Python per operation): for
tests, not for speed.

Shapes: whatever ``fn`` uses; nothing is resized on replay (a graph's tensors have fixed shapes).
"""

from __future__ import annotations

import os
import traceback
import weakref
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


def _refuse(what: str) -> CaptureError:
    """The error, naming the innermost frame outside torch and this module that made the call."""
    here = os.path.abspath(__file__)
    frames = [f for f in traceback.extract_stack()
              if f.filename != here and f"{os.sep}torch{os.sep}" not in f.filename]
    where = f" (at {frames[-1].filename.split(os.sep + 'site-packages' + os.sep)[-1]}:{frames[-1].lineno} " \
            f"{frames[-1].name})" if frames else ""
    return CaptureError(f"{what}: not capturable in a CUDA graph{where}")


class _Host:
    """The tensors that stand for host memory during a capture: the ``host`` roots a caller gives
    (its host copies: on the CPU a copy is just another CPU tensor) and what is computed from them
    alone, or made without a ``device`` (``torch.ones(shape)``, ``torch.tensor(list)``). Work on
    them is the host's own: run at the capture, not replayed (a CUDA graph holds no CPU work), and
    free to read. Every other tensor stands for device memory. By identity (a tensor's ``==`` is
    elementwise)."""

    def __init__(self, roots=()):
        self.refs = {}
        for t in roots:
            self.add(t)

    def add(self, t) -> None:
        self.refs[id(t)] = weakref.ref(t)

    def __contains__(self, t) -> bool:
        ref = self.refs.get(id(t))
        return ref is not None and ref() is t


def _tensors(tree) -> list:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in _tensors(x)]
    return []


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list, host: _Host):
        super().__init__()
        self.ops, self.host = ops, host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        # host work: a tensor from Python data, or no device asked for and only host tensors read
        on_host = "lift_fresh" in name or (kwargs.get("device") is None
                                           and all(t in self.host for t in _tensors((args, kwargs))))
        out = func(*args, **kwargs)
        if on_host:
            for t in _tensors(out):
                self.host.add(t)
            return out
        if name in SYNC_OPS | SIZE_SYNC_OPS and waits(name, args, kwargs):
            raise _refuse(f"{name} reads a device value on the host")
        if not func.is_view:  # a view aliases recorded memory: nothing to re-run
            self.ops.append((func, args, kwargs, out))
        return out


class _NoHostCopies(TorchFunctionMode):
    def __init__(self, host: _Host):
        super().__init__()
        self.host = host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in TRANSFER_CALLS and args and args[0] not in self.host:
            raise _refuse(f"Tensor.{name} copies to the host")
        out = func(*args, **kwargs)
        # from host memory to a device named explicitly: a pageable copy, refused while capturing
        # (an empty one copies nothing: transformers' DynamicLayer starts from torch.tensor([]))
        if ((name in ("tensor", "as_tensor") and kwargs.get("device") is not None) or (
                name in ("to", "cuda") and args and args[0] in self.host and _names_device(args[1:], kwargs))) \
                and isinstance(out, torch.Tensor) and out.numel():
            raise _refuse(f"{name}: a copy from host memory to the device")
        return out


def _names_device(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` / ``cuda`` call names a device (not just a dtype)."""
    return kwargs.get("device") is not None or any(isinstance(a, (str, torch.device)) for a in args)


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

    def capture(self, fn: Callable[[], object], host=()) -> None:
        """Run ``fn`` once, recording its device operations (raises :class:`CaptureError` where a
        CUDA capture would fail). ``host``: tensors that stand for host memory (see :class:`_Host`)."""
        known = _Host(host)
        with _NoHostCopies(known), _Recorder(self.ops, known):
            fn()

    @torch.no_grad()
    def replay(self) -> None:
        """Re-run the recorded operations on the recorded tensors (none of ``fn``'s Python)."""
        for func, args, kwargs, out in self.ops:
            _write(out, func(*args, **kwargs))


def emulated_capture(fn: Callable[[], object], dev=None, warmups: int = 1, host=()) -> EmulatedGraph:
    """:func:`vtoken.engine.graphs._capture`'s counterpart: ``warmups`` eager runs, then the capture."""
    for _ in range(warmups):
        fn()
    graph = EmulatedGraph()
    graph.capture(fn, host)
    return graph
