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

__all__ = ["MemoProcessor"]

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


def _nbytes(out) -> int:
    import torch

    values = out.values() if hasattr(out, "values") else ()
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


class MemoProcessor:
    """``processor`` with its ``__call__`` memoised (every other attribute is the processor's own).

    max_bytes: the most tensor bytes kept (default 4 GiB).
    """

    def __init__(self, processor, max_bytes: int = 4 << 30):
        self._processor = self.__wrapped__ = processor
        self._max_bytes = int(max_bytes)
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        refs: list = []
        tok = getattr(self._processor, "tokenizer", None)
        key = (_key(args, refs), _key(kwargs, refs), getattr(tok, "padding_side", None))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return copy.copy(entry[0])
        out = self._processor(*args, **kwargs)
        self.misses += 1
        size = _nbytes(out)
        if size <= self._max_bytes:
            self._entries[key] = (out, refs, size)
            self._bytes += size
            while self._bytes > self._max_bytes:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
        return copy.copy(out)
