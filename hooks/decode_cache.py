"""The cache side of decode-time stages (:mod:`vtoken.hooks.decode_runtime`): the state a plan
records on the cache (:class:`DecodeState`, each layer's :class:`LayerLayout`), re-laying out a
layer's kept slots (the slots a stage evicts: :mod:`vtoken.scorers.decode_select`), the stash of re-admittable
entries (:class:`StashedKV`, :func:`with_stash`), the low-bit store of ``"quantize"`` mode and the patches that keep a pruned
dynamic cache consistent (its length in original positions; crop, beam reordering and batch
re-selection refused; ``reset`` undoing everything).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from vtoken.errors import UnsupportedCallError
from vtoken.kernels.lowbit import dequantize_tokens, quantize_tokens

DECODE_ATTR = "_vtoken_decode"
LOW_BITS_ATTR = "_vtoken_low_bits"
_PATCHED = ("get_seq_length", "crop", "reset", "reorder_cache", "batch_repeat_interleave", "batch_select_indices")


def held_bytes(cache) -> dict:
    """Bytes a KV cache holds: ``kv`` (the live keys + values of every layer), ``low_bits``
    (:class:`LowBitKV` stores) and ``readmit`` (the stash of a readmit plan, :class:`StashedKV` or
    the candidate buffers of :mod:`vtoken.hooks.decode_readmit`)."""
    kv = low = 0
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if torch.is_tensor(t):
                kv += t.numel() * t.element_size()
        low += getattr(layer.__dict__.get(LOW_BITS_ATTR), "nbytes", 0)
    state = getattr(cache, DECODE_ATTR, None)
    readmit = 0 if state is None else sum(s.nbytes for s in state.stash.values())
    return {"kv": kv, "low_bits": low, "readmit": readmit}


def compact(kept: torch.Tensor, count: Optional[torch.Tensor] = None, P: Optional[int] = None) -> tuple:
    """Each row's kept slots in order, new padding on the left: kept (B, L) bool -> (take (B, P)
    long slot per new slot (0 on padding), valid (B, P) bool), P = the most any row keeps. Given
    the rows' kept ``count`` (B,) and ``P``, no host sync (without them: one, reading P)."""
    B, L = kept.shape
    count = kept.sum(1) if count is None else count
    P = int(count.max()) if P is None else P
    dest = torch.where(kept, (P - count).view(B, 1) + kept.long().cumsum(1) - 1, P)  # P: a column dropped below
    take = torch.zeros(B, P + 1, dtype=torch.long, device=kept.device)
    take.scatter_(1, dest, torch.arange(L, device=kept.device).expand(B, L))
    return take[:, :P], torch.arange(P, device=kept.device).view(1, P) >= (P - count).view(B, 1)


def take_slots(t: torch.Tensor, take: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """t (B, H, L, D) gathered at the slots ``take`` (B, P); padding slots (``~valid``) zeroed."""
    B, P = take.shape
    out = t.gather(2, take.view(B, 1, P, 1).expand(B, t.shape[1], P, t.shape[3]))
    return out.masked_fill(~valid.view(B, 1, P, 1), 0)


@dataclass
class StashedKV:
    """A layer's evicted visual entries kept off the live cache for re-admission
    (``DecodeStage(readmit=True)``, LazyLLM): keys, values (B, H, S, D) exactly as cached,
    positions (B, S) original position of each (-1 padding, on the left), valid (B, S)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


@dataclass
class LayerLayout:
    """A layer's slots after its last eviction: ``positions`` (B, P) original position of each slot
    (-1 padding), ``valid`` (B, P); ``extra``: tokens appended after the prefill at that time (the
    slots after P hold the tokens appended since)."""

    positions: torch.Tensor
    valid: torch.Tensor
    extra: int
    all_valid: bool


@dataclass
class DecodeState:
    """What a decode-time plan records on the KV cache at the prefill. ``n_prefill`` prompt length;
    ``orig_valid`` (B, n) its padding mask; ``segment`` (B, n) the image (segment id) of each
    prunable visual token, -1 elsewhere; ``budgets`` per stage, (S,) long kept per segment;
    ``appended`` (B, extra) validity of the tokens appended since; ``layers`` pruned layer ->
    :class:`LayerLayout`; ``scores`` layer -> (B, L) running scores over its slots; ``offsets`` layer
    -> original length minus physical length; ``next`` index of the next stage to run."""

    n_prefill: int
    orig_valid: torch.Tensor
    orig_all_valid: bool
    segment: torch.Tensor
    budgets: list
    appended: torch.Tensor
    layers: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    offsets: dict = field(default_factory=dict)
    next: int = 0
    evicted: list = field(default_factory=list)  # per stage run: layer -> (B, L) bool evicted slots (stats, tests)
    #: layer -> (query (B, H, D), scaling): the layer's last query, for scorers that ``reads_query``
    queries: dict = field(default_factory=dict)
    #: layer -> :class:`StashedKV`: evicted entries a later ``readmit`` stage may bring back
    stash: dict = field(default_factory=dict)

    @property
    def extra(self) -> int:
        return self.appended.shape[1]


class LowBitKV:
    """A layer's low-precision entries (``mode="quantize"``): keys and values (B, H, Q, D) stored
    by :func:`vtoken.kernels.lowbit.quantize_tokens` at ``bits`` bits; ``read()`` dequantises them
    (the slots before the layer's full-precision ones)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bits: int):
        self.bits = bits
        self.k = quantize_tokens(keys, bits)
        self.v = quantize_tokens(values, bits)

    def read(self) -> tuple:
        return dequantize_tokens(*self.k, self.bits), dequantize_tokens(*self.v, self.bits)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)



def attach_low_bits(kv, store: LowBitKV) -> None:
    """Give cache layer ``kv`` the low-bit ``store``: its ``update`` returns the dequantised
    entries, then its own (what the layer's attention reads)."""
    if LOW_BITS_ATTR in kv.__dict__:
        raise RuntimeError("a cache layer got a second low-bit store")
    kv.__dict__[LOW_BITS_ATTR] = store
    bound = type(kv).update
    kv_ref = weakref.ref(kv)  # no reference cycle through the layer's own attribute

    def update(key_states, value_states, *args, **kwargs):
        layer = kv_ref()
        keys, values = bound(layer, key_states, value_states, *args, **kwargs)
        low_k, low_v = layer.__dict__[LOW_BITS_ATTR].read()
        return torch.cat([low_k, keys], dim=2), torch.cat([low_v, values], dim=2)

    kv.update = update


def patch_cache(cache, state, runtime) -> None:
    """``get_seq_length(layer)`` in original positions; crop, beam reordering and batch
    re-selection refused (they would desynchronise the recorded layouts); ``reset`` forgets the
    record."""
    cache_ref, runtime_ref = weakref.ref(cache), weakref.ref(runtime)
    cls = type(cache)
    # a prefill runtime of the same plan patched these first (its pruned layers' lengths, its record)
    prev_length, prev_reset = cache.__dict__.get("get_seq_length"), cache.__dict__.get("reset")

    def get_seq_length(layer_idx: int = 0):
        if state.layers and not getattr(runtime_ref(), "attached", False):
            raise UnsupportedCallError(
                "this KV cache holds a prompt whose visual entries a since-removed vtoken handle evicted; continue "
                "generating with that handle attached, or start again without past_key_values")
        physical = prev_length(layer_idx) if prev_length is not None else cls.get_seq_length(cache_ref(), layer_idx)
        return physical + state.offsets.get(layer_idx, 0) if physical else physical

    def refuse(*_a, **_k):
        raise UnsupportedCallError(
            "a KV cache pruned by a decode-time vtoken plan cannot be cropped or have its rows reordered (assisted "
            "decoding, beam search, contrastive search): use greedy or sampling without an assistant")

    def reset():
        c = cache_ref()
        for name in _PATCHED + (DECODE_ATTR,):
            c.__dict__.pop(name, None)
        for kv in c.layers:
            for name in (LOW_BITS_ATTR, "update"):
                kv.__dict__.pop(name, None)
        if prev_reset is not None:
            prev_reset()
        else:
            cls.reset(c)

    cache.get_seq_length = get_seq_length
    for name in _PATCHED[1:]:
        if callable(getattr(cls, name, None)):
            setattr(cache, name, reset if name == "reset" else refuse)


def with_stash(stash: StashedKV, pos: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor) -> tuple:
    """A layer's live slots (pos, valid (B, L); keys, values (B, H, L, D)) and its stashed entries
    as one candidate set in original position order (padding, -1, first): -> (pos, valid, keys,
    values) over the L + S slots."""
    order = torch.sort(torch.cat([stash.positions, pos], 1), dim=1, stable=True).indices
    pos = torch.cat([stash.positions, pos], 1).gather(1, order)
    valid = torch.cat([stash.valid, valid], 1).gather(1, order)
    keys = torch.cat([stash.keys, keys], 2).gather(2, _expand(order, keys))
    values = torch.cat([stash.values, values], 2).gather(2, _expand(order, values))
    return pos, valid, keys, values


def _expand(order: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A (B, L) slot order as an index for t (B, H, L, D) along dim 2."""
    B, L = order.shape
    return order.view(B, 1, L, 1).expand(B, t.shape[1], L, t.shape[3])
