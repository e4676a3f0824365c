"""The vision features of a batch, computed once for every method that leaves the vision tower alone.

``vtoken eval`` answers the same batch of questions once per (method, budget). A method that prunes
in or after the projector (FastV, DivPrune, ...) changes nothing the vision tower computes, so the
tower's output for a batch is the same in each of those runs; on the tiny reference checkpoints the
tower is most of the work (tiny-qwen2vl on a 2-core CPU: 78 % of an evaluation's time). A
:class:`VisionMemo` wraps the multimodal model's ``get_image_features`` / ``get_video_features``
(the adapter's model; transformers calls them from ``forward`` or, in newer versions, from
``generate`` before the prefill) and returns the stored output of a call it has seen under the
same :attr:`key`.

The caller (the eval backend) sets :attr:`key` before each ``generate``: the batch's identity (its
images by identity, its questions) plus which tower variant runs (the plain model's, or the tower
as a pruning handle patches it: the varlen attention where Triton runs, equal to the plain one
bit for bit elsewhere); ``None`` turns the memo off for the call (a plan that reads the vision
encoder's attention needs the tower to run: its probes capture inside it). Each call's arguments
are part of the entry's key too (tensor shapes, dtypes and devices, small integer tensors such as
``image_grid_thw`` by value, everything else by value), so a different call never gets another's
features. Entries hold references to the objects their key names by identity, so no other object
can take that identity while the entry lives; they are dropped oldest first beyond ``max_bytes``.

``max_bytes`` bounds one process; on a GPU shared by several eval shards (``benchmarks/eval/run_gpu.sh``
runs 14 per checkpoint on one card) the card is the bound that matters, so an output on a CUDA device
is stored only while that card has at least :data:`CARD_FREE_FRACTION` of its memory free
(:func:`card_has_room`); when it has not, the memo drops what it holds and computes as usual.
"""

from __future__ import annotations

from typing import Optional

import torch

from vtoken.eval.memo import ByteLRU, iter_tensors

__all__ = ["VisionMemo", "FEATURE_METHODS", "card_has_room"]

#: the multimodal model's methods that run the vision tower (and projector) on pixel inputs
FEATURE_METHODS = ("get_image_features", "get_video_features")

#: an output on a CUDA device is stored only while its card has at least this fraction of its memory free
CARD_FREE_FRACTION = 0.125

#: integer tensors of at most this many elements are keyed by value (grids, sizes)
_SMALL = 4096


def _arg_key(value):
    if isinstance(value, torch.Tensor):
        small = not value.is_floating_point() and value.numel() <= _SMALL
        return ("t", tuple(value.shape), str(value.dtype), str(value.device),
                tuple(value.reshape(-1).tolist()) if small else None)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_arg_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _arg_key(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))))
    return ("v", type(value).__name__, value if isinstance(value, (str, int, float, bool, type(None))) else repr(value))


def _first_cuda_device(value) -> Optional[torch.device]:
    return next((t.device for t in iter_tensors(value) if t.device.type == "cuda"), None)


def card_has_room(value, mem_get_info=None) -> bool:
    """Whether ``value`` (a feature method's output) may be stored: True unless it holds a CUDA
    tensor whose card has less than :data:`CARD_FREE_FRACTION` of its memory free (the processes
    sharing the card included: ``torch.cuda.mem_get_info`` asks the driver; this process's allocator
    cache counts as free)."""
    device = _first_cuda_device(value)
    if device is None:
        return True
    free, total = (mem_get_info or torch.cuda.mem_get_info)(device)
    if mem_get_info is None:  # this process's cached, unused blocks are free to it too
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free >= CARD_FREE_FRACTION * total


class VisionMemo:
    """Memoised feature methods of ``model`` (the adapter's multimodal model) while installed.

    ``key``: the identity of the next calls' inputs (hashable), or None (compute as usual);
    ``refs``: objects the key names by identity (kept alive with the entry). ``max_bytes``: the
    most tensor bytes kept (default 2 GiB). ``hits`` / ``misses`` count keyed calls."""

    def __init__(self, model, max_bytes: int = 2 << 30):
        self.model = model
        self.key: Optional[tuple] = None
        self.refs: tuple = ()
        self._store = ByteLRU(max_bytes)
        self._installed = []
        for name in FEATURE_METHODS:
            original = getattr(model, name, None)
            if callable(original) and name not in vars(model):
                setattr(model, name, self._wrap(name, original))
                self._installed.append(name)

    hits = property(lambda self: self._store.hits)
    misses = property(lambda self: self._store.misses)

    def _wrap(self, name, original):
        def features(*args, **kwargs):
            if self.key is None or torch.is_grad_enabled():
                return original(*args, **kwargs)
            key = (name, self.key, _arg_key(args), _arg_key(kwargs))
            out = self._store.get(key)
            if out is None:
                out = original(*args, **kwargs)
                if card_has_room(out):
                    self._store.put(key, out, self.refs)
                else:  # the card is short (shards beside this one): hold nothing on it
                    self._store.clear()
            return out

        features.__wrapped__ = original
        return features

    def remove(self) -> None:
        """Restore the model's own methods and drop every entry."""
        for name in self._installed:
            vars(self.model).pop(name, None)
        self._installed = []
        self._store.clear()
