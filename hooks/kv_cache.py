"""The KV cache a pruned prefill fills: how it is recognised and kept consistent.

A pruned prefill leaves its record (:class:`vtoken.hooks.call_state.PruneState`) on the cache
object itself (``STATE_ATTR``), so decode steps, continuations and stats find it without any
global state. The cache's ``get_seq_length`` and ``crop`` are patched on the instance so that
transformers, which counts in original (unpruned) positions, keeps working on shorter layers.
"""

from __future__ import annotations

import weakref

import torch

STATE_ATTR = "_vtoken_state"
#: on a fixed-slot cache once its prefill has run: the :class:`FixedSlots` its decode steps read
FIXED_ATTR = "_vtoken_fixed"


def cache_arg(kwargs: dict):
    """The KV cache a language-model call received: ``past_key_values`` (transformers <= 5.23) or
    ``cache`` (the name from 5.24 on)."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache


def fixed_slot_cache(cache) -> bool:
    """A KV cache whose layers keep a fixed slot per position (transformers' StaticCache and its
    sliding-window / hybrid kin: ``is_compileable`` layers), which a pruned layer cannot fill."""
    if cache is None:
        return False
    layers = getattr(cache, "layers", None)
    if layers:
        return any(getattr(layer, "is_compileable", False) for layer in layers)
    return bool(getattr(cache, "is_compileable", False))


class FixedSlots:
    """What the decode steps on a fixed-slot cache (transformers' StaticCache) need of its prefill:
    ``prefix`` (one (B, N_s) bool per stage, the validity of the slots the pruned prefill wrote in
    the layers after stage ``s``; empty when the prefill dropped nothing: every step runs as the
    plain model's). Read by traced code (a compiled decode step), so it holds tensors and a list
    that never change after the prefill."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: list):
        self.prefix = prefix


def fixed_slots_of(kwargs: dict):
    """The :class:`FixedSlots` of the cache a call received (None: not a fixed-slot cache whose
    prefill vtoken saw). Traceable: transformers compiles the decode steps of a static cache."""
    cache = cache_arg(kwargs)
    return None if cache is None else getattr(cache, FIXED_ATTR, None)


def fixed_cache_problem(cache):
    """Why vtoken cannot prune into ``cache``'s fixed slots (None: it can): every layer must be a
    full-attention static layer that counts its writes (``cumulative_length``)."""
    for layer in getattr(cache, "layers", None) or ():
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "cumulative_length") or not hasattr(
                layer, "max_cache_len"):
            return f"its layer type {type(layer).__name__} (sliding window, or no write count) cannot hold a pruned layer"
    if not getattr(cache, "layers", None):
        return f"{type(cache).__name__} has no per-layer slots vtoken can size"
    return None


def size_fixed_layer(cache, layer_idx: int, slots: int) -> None:
    """Give layer ``layer_idx`` of a fixed-slot ``cache`` ``slots`` slots (its pruned prefill plus
    the tokens to come) before the prefill writes into it: buffers a pruned layer allocates are
    only as long as what it keeps. A layer already allocated at another length (a cache built
    with ``early_initialization``, or reused) gets new zeroed buffers."""
    layer = cache.layers[layer_idx]
    originals = cache.__dict__.setdefault("_vtoken_slots", {})
    originals.setdefault(layer_idx, layer.max_cache_len)
    if layer.max_cache_len == slots:
        return
    layer.max_cache_len = slots
    if getattr(layer, "is_initialized", False):
        for name in ("keys", "values"):
            old = getattr(layer, name)
            new = old.new_zeros(old.shape[:2] + (slots,) + old.shape[3:])
            torch._dynamo.mark_static_address(new)
            setattr(layer, name, new)


def mark_fixed_passthrough(cache) -> None:
    """A fixed-slot cache whose prefill dropped nothing: its later steps run as the plain model's."""
    setattr(cache, FIXED_ATTR, FixedSlots([]))
    _patch_reset(cache)


def _patch_reset(cache) -> None:
    """``cache.reset()`` (a cache the user reuses) also forgets vtoken's record and patches, and
    gives the static layers it sized their original length back (their buffers are allocated again
    at the next prefill): the next prompt starts as on a new cache."""
    if "reset" in cache.__dict__ or not callable(getattr(type(cache), "reset", None)):
        return
    bound = type(cache).reset
    cache_ref = weakref.ref(cache)

    def reset():
        c = cache_ref()
        bound(c)
        for attr in (STATE_ATTR, FIXED_ATTR, "get_seq_length", "crop", "reset"):
            c.__dict__.pop(attr, None)
        for idx, slots in c.__dict__.pop("_vtoken_slots", {}).items():
            layer = c.layers[idx]
            if layer.max_cache_len != slots:
                layer.max_cache_len = slots
                layer.keys = layer.values = None
                layer.is_initialized = False

    cache.reset = reset


def record_pruned_prefill(cache, state, layer_stage: list, runtime) -> None:
    """Store ``state`` on ``cache`` and patch its length and crop for the pruned layers."""
    setattr(cache, STATE_ATTR, state)
    _patch_seq_length(cache, state, layer_stage, runtime)
    _patch_crop(cache, state)
    _patch_reset(cache)


def _patch_seq_length(cache, state, layer_stage: list, runtime=None) -> None:
    """Make ``cache.get_seq_length(layer)`` report the ORIGINAL (unpruned) length, which is what
    transformers uses it for (positions, slicing new tokens on continuation). Once ``runtime``'s
    handle is removed, a cache whose prefix it pruned refuses instead (transformers asks for the
    length before it continues from a cache): the plain model would attend to its shorter layers
    with masks for the full length."""
    if "get_seq_length" in cache.__dict__:
        return
    bound = type(cache).get_seq_length
    cache_ref = weakref.ref(cache)  # no reference cycle: the cache's memory goes when generate drops it
    runtime_ref = weakref.ref(runtime) if runtime is not None else None

    def get_seq_length(layer_idx: int = 0):
        if runtime_ref is not None and not getattr(runtime_ref(), "attached", False) and not all(
                st.identity for st in state.stages):
            from vtoken.errors import UnsupportedCallError

            raise UnsupportedCallError(
                "this KV cache holds a prompt pruned by a vtoken handle that has since been removed (its pruned "
                "layers are shorter than the prompt); continue generating with that handle attached, or start "
                "again without past_key_values"
            )
        physical = bound(cache_ref(), layer_idx)  # an int, or a static layer's 0-d write count
        i = layer_stage[layer_idx] if layer_idx < len(layer_stage) else -1
        if i < 0 or i >= len(state.stages) or (not torch.is_tensor(physical) and physical == 0):
            return physical
        return physical + state.n_prefill - state.stages[i].positions.shape[1]

    cache.get_seq_length = get_seq_length


def _patch_crop(cache, state) -> None:
    """Keep the pruned prefix's record (``state``: the tokens appended after the prefill, which size
    the decode masks, and each stage's layout) in step when transformers crops the cache: assisted /
    prompt-lookup decoding drops rejected candidate tokens (with an assistant model the prefill
    itself ends with candidates), a deferred stop check undoes a step. Every layer loses the same
    number of tokens, pruned or not; a positive argument (the legacy absolute length, in the
    original coordinates ``get_seq_length`` reports) is turned into that number."""
    if "crop" in cache.__dict__ or not callable(getattr(type(cache), "crop", None)):
        return
    bound = type(cache).crop
    cache_ref = weakref.ref(cache)

    def crop(tokens_to_remove: int):
        c = cache_ref()
        if tokens_to_remove > 0:
            tokens_to_remove = -max(c.get_seq_length() - tokens_to_remove, 0)
        out = bound(c, tokens_to_remove)
        remove = -min(tokens_to_remove, 0)
        from_extra = min(remove, state.extra)
        state.extra -= from_extra
        rest = remove - from_extra
        if rest:  # the prefill itself ended with candidates (assisted decoding): its last slots go
            # (text tokens, valid in every row and kept by every stage, so the last slots of each layout)
            state.n_prefill -= rest
            for st in state.stages:
                st.positions, st.valid = st.positions[:, :-rest], st.valid[:, :-rest]
        return out

    cache.crop = crop
