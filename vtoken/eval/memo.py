"""The processor's outputs, computed once per batch of an evaluation run.

``vtoken eval`` answers the same batches of questions once per (method, budget): with 34 methods
at 3 budgets, each batch reaches the processor about a hundred times, and on the tiny reference
checkpoints preprocessing (about 6 ms a question on one CPU core) costs more than the model. A
:class:`MemoProcessor` wraps the processor and returns the stored output of a call it has seen.

A call is identified by its arguments: strings, numbers and ``None`` by value, containers item by
item, anything else (a PIL image, an array of frames) by identity, plus the tokenizer's
``padding_side``. ``__wrapped__`` is the processor. An entry holds references to the objects it was keyed by, so no other object can
take their identity while the entry lives. Entries are dropped oldest first once their tensors
exceed ``max_bytes``. Each hit returns a shallow copy (a new mapping over the same tensors).
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Mapping

__all__ = ["ByteLRU", "MemoProcessor", "iter_tensors", "tensor_bytes"]

_VALUE_TYPES = (str, int, float, bool, bytes, type(None))


def _key(value, refs: list):
    if isinstance(value, _VALUE_TYPES):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v, refs) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _key(v, refs)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))))
    refs.append(value)
    return ("id", id(value))


def iter_tensors(out):
    """The tensors in ``out``: a tensor, a mapping (a ``BatchFeature``, a model output) or a list /
    tuple of them, nested."""
    import torch

    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (Mapping, list, tuple)):
        for v in out.values() if isinstance(out, Mapping) else out:
            yield from iter_tensors(v)


def tensor_bytes(out) -> int:
    """Bytes of the tensors in ``out`` (:func:`iter_tensors`)."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(out))


class ByteLRU:
    """Stored values by key, the least recently used dropped first once their bytes (``size_of``,
    default :func:`tensor_bytes`) exceed ``max_bytes`` (a value larger than that is not stored).
    Each entry keeps ``refs``: the objects its key names by identity, alive while it lives.
    ``hits`` / ``misses`` count :meth:`get`."""

    def __init__(self, max_bytes: int, size_of=tensor_bytes):
        self.max_bytes = int(max_bytes)
        self.size_of = size_of
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key):
        """The value stored under ``key``, or None (a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key, value, refs) -> None:
        size = self.size_of(value)
        if size > self.max_bytes:
            return
        self._entries[key] = (value, refs, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


class MemoProcessor:
    """``processor`` with its ``__call__`` memoised (every other attribute is the processor's own).

    max_bytes: the most tensor bytes kept (default 4 GiB).
    """

    def __init__(self, processor, max_bytes: int = 4 << 30):
        self._processor = self.__wrapped__ = processor
        self._store = ByteLRU(max_bytes)

    hits = property(lambda self: self._store.hits)
    misses = property(lambda self: self._store.misses)

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        refs: list = []
        tok = getattr(self._processor, "tokenizer", None)
        key = (_key(args, refs), _key(kwargs, refs), getattr(tok, "padding_side", None))
        out = self._store.get(key)
        if out is None:
            out = self._processor(*args, **kwargs)
            self._store.put(key, out, refs)
        return copy.copy(out)
