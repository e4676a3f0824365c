"""Where the host would wait for the GPU, counted on any device (issue 23 item 2; the tests' sync counts).

On CUDA, every call that needs a value the GPU computed (``.item()``, ``int(t)``, ``bool(t)``,
``nonzero``, ``torch.equal``...) and every copy to the host (``tolist``, ``numpy``, ``cpu``) waits
until the GPU has run everything queued before it, so the launches after it no longer overlap the
GPU's work. The same calls are made on the CPU, where they cost nothing: counting them there finds
the waits without a GPU. :class:`SyncCounter` counts the ATen ops (a dispatch mode: the same ops
on CUDA); :class:`TransferCounter` the copies, which on a CPU tensor never reach the dispatcher (a
function mode). With ``where`` (e.g. :func:`call_site`) both also count by the code that made the
call; :func:`recording` does both by call site (``benchmarks/profile/host_syncs.py``) and
:func:`cuda_waits` records the waits PyTorch itself reports on a GPU (``benchmarks/e2e/profile_ttft.py``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import traceback
import warnings
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from vtoken.engine.graph_emulator import SIZE_SYNC_OPS, SYNC_OPS, TRANSFER_CALLS, waits as _waits

class SyncCounter(TorchDispatchMode):
    """Counts the ``ops`` (default :data:`SYNC_OPS`) while active and ``on``: ``found`` by op name;
    with ``where`` (a callable returning a string), ``sites`` by (op, ``where()``)."""

    def __init__(self, ops: frozenset = SYNC_OPS, where: Optional[Callable[[], str]] = None):
        super().__init__()
        self.on, self.ops, self.where = True, ops, where
        self.found, self.sites = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self.on and name in self.ops and _waits(name, args, kwargs):
            self.found[name] += 1
            if self.where is not None:
                self.sites[(name, self.where())] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.found.values())


class TransferCounter(TorchFunctionMode):
    """Counts ``Tensor.tolist`` / ``numpy`` / ``cpu`` calls while active (a copy to the host);
    ``found`` by method, ``sites`` by (method, ``where()``) with ``where``."""

    def __init__(self, where: Optional[Callable[[], str]] = None):
        super().__init__()
        self.where = where
        self.found, self.sites = collections.Counter(), collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in TRANSFER_CALLS:
            self.found[name] += 1
            if self.where is not None:
                self.sites[(name, self.where())] += 1
        return func(*args, **(kwargs or {}))


def count_syncs(fn: Callable[[], object], transfers: bool = True) -> int:
    """Host syncs while ``fn()`` runs: the :data:`SYNC_OPS`, plus (``transfers``) copies to the host
    by ``tolist`` / ``numpy`` / ``cpu`` (counted even of CPU tensors: on a GPU they wait)."""
    ops, copies = SyncCounter(), TransferCounter()
    with copies if transfers else contextlib.nullcontext(), ops:
        fn()
    return ops.total + (sum(copies.found.values()) if transfers else 0)


def _sources() -> tuple:
    import vtoken
    import vtoken.hooks
    import vtoken.kernels
    import vtoken.scorers

    return tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                 for m in (vtoken, vtoken.hooks, vtoken.scorers, vtoken.kernels))


def call_site(depth: int = 3) -> str:
    """The innermost ``depth`` frames of vtoken or transformers on the stack (``file:line function``,
    innermost first; this module's own frames left out)."""
    sources, here = _sources(), os.path.abspath(__file__)
    tf = f"{os.sep}transformers{os.sep}"
    frames = [f for f in traceback.extract_stack()
              if f.filename != here and (f.filename.startswith(sources) or tf in f.filename)]
    return " <- ".join(f"{_short(f.filename, sources)}:{f.lineno} {f.name}" for f in reversed(frames[-depth:]))


def _short(filename: str, sources: tuple) -> str:
    for root in sources:
        if filename.startswith(root):
            return os.path.join(os.path.basename(root.rstrip(os.sep)), filename[len(root):])
    return filename.split("site-packages" + os.sep)[-1]


@contextlib.contextmanager
def recording():
    """Yields a Counter of (what waits, call site) filled while the block runs (on any device)."""
    sites = collections.Counter()
    ops, copies = SyncCounter(SYNC_OPS | SIZE_SYNC_OPS, where=call_site), TransferCounter(where=call_site)
    with copies, ops:
        yield sites
    sites.update({(name.replace("aten.", "").replace(".default", ""), where): n for (name, where), n in (ops.sites + copies.sites).items()})


@contextlib.contextmanager
def cuda_waits():
    """On CUDA: yields a Counter of the call sites where PyTorch reports a synchronizing operation
    (``torch.cuda.set_sync_debug_mode("warn")``: every device-to-host copy, ``item``, ``nonzero``...),
    each recorded from the warning's own Python stack."""
    sites = collections.Counter()
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if "synchroniz" in str(message):
            sites[("cuda sync", call_site(depth=4))] += 1
        else:
            shown(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = shown
