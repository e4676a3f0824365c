"""The static KV buffers of :class:`~vtoken.engine.StaticDecoder` and how prefill chunks fill them.

- :class:`LayoutGroup`: one group of layers sharing a prefill layout, with its kept-index list,
  kept count and write slot.
- :class:`StaticKV`: the per-layer buffers ``[B, Hkv, N_l + T, D]``, and the cache object decoder
  layers see during a decode step (``update`` writes the step's key/value at the group's slot).
- ``_KVBuffers``: the decoder's methods that allocate the buffers, copy each prefill chunk's
  dynamic cache into them (widening a group when a later chunk's layout is longer) and build the
  kept-index lists once every chunk is stored. A mixin of ``StaticDecoder``: it reads
  ``self.adapter`` and sets ``self.groups`` / ``self.layer_group``.
- ``_cache_layer_kv`` / ``_release_layer`` / ``_kept_index``: helpers on a transformers dynamic
  cache and on a validity mask, no decoder needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


# ------------------------------------------------------------------------------------ KV buffers
@dataclass
class LayoutGroup:
    """Layers that share one prefill layout (all layers before the first stage, or all layers
    after stage i). ``idx [B, N + T]`` int32 kept-index list, ``count [B]`` int32 kept entries
    (updated in place each step), ``base [B]`` valid prefill entries, ``slot [1]`` long write slot."""

    n_prefill: int
    idx: torch.Tensor
    base: torch.Tensor
    count: torch.Tensor
    slot: torch.Tensor


class StaticKV:
    """The cache object decoder layers see during static decode steps: ``update`` writes the step's
    key/value into the layer's buffer at the group's write slot and returns the whole buffer."""

    def __init__(self, keys: list, values: list, layer_group: list, groups: list):
        self.keys, self.values, self.layer_group, self.groups = keys, values, layer_group, groups
        self.capacity: list = []  # per group: prefill slots of its buffers
        self.valid_rows: list = []  # per group: [(rows, valid [b, n])] of each prefill chunk

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        slot = self.groups[self.layer_group[layer_idx]].slot
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, slot, key_states)
        v.index_copy_(2, slot, value_states)
        return k, v

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def _cache_layer_kv(cache, layer: int):
    """(keys, values) ``[B, Hkv, N, D]`` of one layer of a transformers dynamic cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]  # older cache API


def _kept_index(valid: torch.Tensor, new_tokens: int) -> tuple:
    """valid ``[B, N]`` bool -> (idx ``[B, N + T]`` int32: valid slots in order, then slots
    N..N+T-1; base ``[B]`` int32 valid count)."""
    B, N = valid.shape
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    future = torch.arange(N, N + new_tokens, device=valid.device).expand(B, new_tokens)
    base = valid.sum(1)
    # the future slots go right after each row's valid prefix: positions base .. base+T-1
    idx = torch.cat([order, torch.zeros_like(future)], dim=1)
    idx.scatter_(1, base.unsqueeze(1) + torch.arange(new_tokens, device=valid.device), future)
    return idx.to(torch.int32), base.to(torch.int32)


def _release_layer(cache, layer: int) -> None:
    """Drop one layer's tensors from a dynamic cache (its copy now lives in the static buffers)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        layers[layer].keys = layers[layer].values = None


def _restore_layer(cache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put back what :func:`_release_layer` dropped (a captured prefill head's cache is reused)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        layers[layer].keys, layers[layer].values = keys, values


class _KVBuffers:
    """:class:`~vtoken.engine.StaticDecoder`'s buffer methods (needs ``self.adapter``)."""

    def _kv_shape(self, layer: int) -> tuple:
        attn = self.adapter.layers[layer].self_attn
        head_dim = int(attn.head_dim)
        return attn.k_proj.out_features // head_dim, head_dim

    def _allocate(self, batch: int, capacity: list, layer_group: list, new_tokens: int, like: torch.Tensor,
                  keys: Optional[list] = None, values: Optional[list] = None) -> StaticKV:
        """Static buffers ``[B, Hkv, capacity[g] + T, D]`` per layer (keeping the prefix of any
        ``keys``/``values`` given, when a group widens)."""
        new_keys, new_values = [], []
        for layer, g in enumerate(layer_group):
            hkv, d = self._kv_shape(layer)
            shape = (batch, hkv, capacity[g] + new_tokens, d)
            old_k = keys[layer] if keys is not None else None
            if old_k is not None and old_k.shape == shape:
                new_keys.append(old_k)
                new_values.append(values[layer])
                continue
            kb, vb = like.new_empty(shape), like.new_empty(shape)
            if old_k is not None:
                n = old_k.shape[2] - new_tokens
                kb[:, :, :n].copy_(old_k[:, :, :n])
                vb[:, :, :n].copy_(values[layer][:, :, :n])
            new_keys.append(kb)
            new_values.append(vb)
        kv = StaticKV(new_keys, new_values, layer_group, [])
        kv.capacity = list(capacity)
        kv.valid_rows = [[] for _ in capacity]
        return kv

    def _store_chunk(self, kv: Optional[StaticKV], cache, valids: list, layer_group: list, rows: slice,
                     batch: int, new_tokens: int, like: torch.Tensor, upto: Optional[int] = None) -> StaticKV:
        """Copy one prefill chunk's KV cache (layers below ``upto``) into the static buffers (rows
        ``rows`` of ``batch``), allocating them on the first chunk and widening a group's buffers
        if a later chunk's layout is longer. The chunk's cache is released layer by layer."""
        caps = [v.shape[1] for v in valids]
        if kv is None:
            kv = self._allocate(batch, caps, layer_group, new_tokens, like)
        elif any(c > k for c, k in zip(caps, kv.capacity)):
            rows_seen = kv.valid_rows
            kv = self._allocate(batch, [max(c, k) for c, k in zip(caps, kv.capacity)], layer_group, new_tokens, like,
                                kv.keys, kv.values)
            kv.valid_rows = rows_seen
        for g, valid in enumerate(valids):
            kv.valid_rows[g].append((rows, valid.bool()))
        for layer in range(len(layer_group) if upto is None else upto):
            k, v = _cache_layer_kv(cache, layer)
            n = valids[layer_group[layer]].shape[1]
            if k.shape[2] != n:
                raise RuntimeError(f"layer {layer}: prefill cache holds {k.shape[2]} entries, layout has {n}")
            kv.keys[layer][rows, :, :n].copy_(k)
            kv.values[layer][rows, :, :n].copy_(v)
            _release_layer(cache, layer)
        return kv

    def _finish_buffers(self, kv: StaticKV, batch: int, new_tokens: int, device) -> None:
        """Kept-index lists once every chunk is stored: valid prefill slots, then the new tokens'
        slots ``capacity .. capacity + T - 1`` (one write slot per group for the whole batch).
        Index tensors a session already holds are refilled in place (captured graphs read them)."""
        groups = []
        for g, cap in enumerate(kv.capacity):
            valid = torch.zeros(batch, cap, dtype=torch.bool, device=device)
            for rows, v in kv.valid_rows[g]:
                valid[rows, : v.shape[1]] = v
            idx, base = _kept_index(valid, new_tokens)
            if g < len(kv.groups):
                old = kv.groups[g]
                old.idx.copy_(idx)
                old.base.copy_(base)
                old.count.copy_(base)
                groups.append(old)
            else:
                groups.append(LayoutGroup(n_prefill=cap, idx=idx, base=base, count=base.clone(),
                                          slot=torch.zeros(1, dtype=torch.long, device=device)))
        kv.groups = groups
        self.groups, self.layer_group = groups, kv.layer_group
