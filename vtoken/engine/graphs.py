"""CUDA-graph capture and replay for :class:`~vtoken.engine.StaticDecoder`.

- ``_capture``: warm a closure up on a side stream, then capture it as a ``torch.cuda.CUDAGraph``
  (the prefill tail, the decode step, the vision tower); ``capture`` / ``graph_mode``: that, or with
  ``cuda_graph="emulate"`` the CPU stand-in of :mod:`vtoken.engine.graph_emulator`.
- ``_GraphedForward``: a module's ``forward`` replayed as a graph, one per input signature (the
  vision tower), falling back to eager when a forward cannot be captured; ``_signature``,
  ``_clone`` and ``_copy_into`` walk its nested arguments.
- ``_Session``: every tensor a captured graph reads (static KV buffers, the decode step's
  inputs/outputs, the tail's inputs) and the graphs themselves, kept for later calls with the
  same shapes that ask for no more new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from vtoken.engine.graph_emulator import emulated_capture
from vtoken.engine.static_kv import StaticKV
from vtoken.errors import PruningConfigError


_SIDE_STREAMS: dict = {}  # device -> the one stream every capture warms up and captures on


def _capture(fn, dev, warmups: int = 1, checked: bool = False):
    """Warm ``fn`` up on a side stream (Triton compilation, cuBLAS workspaces), then capture it on
    that stream (what the warm-up left keyed by stream, e.g. a host plan's upload, is found again:
    nothing is copied from host memory inside the capture). One stream per device for all captures
    (one cuBLAS workspace). ``checked``: the last warm-up runs with PyTorch's sync check raising (the
    ones before may autotune, which synchronizes), so a function that reads the device on the host
    fails there, before a capture it would invalidate (a failed capture can leave the allocator's
    private pool behind)."""
    dev = torch.device(dev)
    side = _SIDE_STREAMS.get(dev)
    if side is None:
        side = _SIDE_STREAMS[dev] = torch.cuda.Stream(device=dev)
    current = torch.cuda.current_stream(dev)
    graph = torch.cuda.CUDAGraph()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        mode = torch.cuda.get_sync_debug_mode()
        try:
            for i in range(warmups):
                if checked and i == warmups - 1:
                    torch.cuda.set_sync_debug_mode("error")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    current.wait_stream(side)
    try:
        with torch.cuda.graph(graph, stream=side):
            fn()
    finally:
        torch.cuda.set_stream(current)  # (a failed capture's exit does not restore it)
    return graph


def capture(mode, fn, dev, warmups: int = 1, host=(), checked: bool = False):
    """A CUDA graph of ``fn`` (:func:`_capture`), or with ``mode == "emulate"`` its stand-in (which
    takes ``host``, the tensors standing for host memory: :mod:`vtoken.engine.graph_emulator`)."""
    if mode == "emulate":
        return emulated_capture(fn, dev, warmups, host)
    return _capture(fn, dev, warmups, checked)


def graph_mode(value, name: str = "cuda_graph", word: str = "emulate"):
    """A ``StaticDecoder`` option, checked: None, True, False or ``word`` (``cuda_graph="emulate"``:
    :mod:`vtoken.engine.graph_emulator`'s captures on any device; ``graph_prefill="all"``)."""
    if value is not None and value is not True and value is not False and value != word:
        raise PruningConfigError(f"{name} must be None, True, False or {word!r}, got {value!r}")
    return value


def _signature(value):
    if torch.is_tensor(value):
        return ("T", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    return repr(value)


def _copy_into(dst, src):
    if torch.is_tensor(dst):
        dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_into(d, s)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])


def _clone(value):
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


class _GraphedForward:
    """A module's ``forward`` replayed as a CUDA graph, one graph per input signature (shapes,
    dtypes, non-tensor arguments). Outputs are the graph's static tensors, valid until the next
    replay. A forward that cannot be captured (host syncs, data-dependent shapes: e.g. Qwen's
    windowed vision tower) runs eagerly from then on (``self.failed`` says why)."""

    def __init__(self, module, capture):
        self.forward, self.capture, self.graphs, self.failed = module.forward, capture, {}, None

    def __call__(self, *args, **kwargs):
        if self.failed is not None:
            return self.forward(*args, **kwargs)
        key = _signature((args, kwargs))
        entry = self.graphs.get(key)
        if entry is None:
            static = _clone((args, kwargs))
            box = {}

            def run():
                box["out"] = self.forward(*static[0], **static[1])

            try:
                graph = self.capture(run)
            except Exception as exc:  # noqa: BLE001 - not capturable: stay eager
                self.failed = f"{type(exc).__name__}: {exc}"
                if torch.cuda.is_available():  # (an emulated capture runs on any device)
                    torch.cuda.synchronize()
                return self.forward(*args, **kwargs)
            entry = self.graphs[key] = (graph, static, box)
        graph, static, box = entry
        _copy_into(static, (args, kwargs))
        graph.replay()
        return box["out"]


@dataclass
class _Session:
    """What captured graphs point at, reused by later calls with the same shapes: the static KV
    buffers, the per-group index tensors, the decode step's input/output tensors, the graphs."""

    signature: tuple
    kv: StaticKV
    tok: torch.Tensor
    t: torch.Tensor
    new: torch.Tensor
    pos_next: torch.Tensor
    suppress: Optional[torch.Tensor] = None  # token ids masked at every step (read by the decode graph)
    decode_graphs: dict = field(default_factory=dict)  # the decode step's graph per token choice (outside or not)
    tail_inputs: Optional[dict] = None
    tail_logits: Optional[torch.Tensor] = None
    tail_graph: object = None
    logits: Optional[torch.Tensor] = None  # with a ``next_token`` chooser: the step's logits, the token chosen outside

    @classmethod
    def fresh(cls, signature: tuple, kv: StaticKV, batch: int, new_tokens: int, pad: int, dev,
              suppress: Optional[torch.Tensor]) -> "_Session":
        """A new session with room for ``new_tokens`` tokens per row (``new [B, T]`` filled with ``pad``)."""
        return cls(signature=signature, kv=kv, tok=torch.zeros(batch, 1, dtype=torch.long, device=dev),
                   t=torch.zeros(1, dtype=torch.long, device=dev),
                   new=torch.full((batch, new_tokens), pad, dtype=torch.long, device=dev),
                   pos_next=torch.zeros(batch, dtype=torch.long, device=dev), suppress=suppress)

    def serves(self, signature: tuple, new_tokens: int) -> bool:
        """Whether this session serves a call of ``signature`` asking for ``new_tokens``: same shapes,
        and room for at least that many new tokens (a call asking for fewer leaves the last slots
        unused: the graphs read the step ``t`` and the kept counts, never the length)."""
        return self.signature == signature and self.new.shape[1] >= new_tokens

    def chosen(self, i: int, tokens: torch.Tensor) -> bool:
        """Token ``i`` (``[B]``), chosen outside the captured step: the next step's input."""
        self.new[:, i] = tokens
        self.tok.copy_(tokens.unsqueeze(1))
        return True
