"""Static-cache decode: preallocated KV buffers, kept-index lists, ``gather_attend``, CUDA graphs.

``model.generate`` (the default path) decodes through ``transformers``' dynamic cache: every step
is launched from Python layer by layer, and a 7B model's decode is bound by those launches (about
1.3 ms per layer on an H100 whatever the context, docs/DESIGN.md section 7), so a shorter pruned KV
cache barely shows. :class:`StaticDecoder` is the serving-style path:

1. **Prefill** runs the model's own forward (pruned by the attached :func:`vtoken.apply_pruning`
   handle, if any) with a dynamic cache; on CUDA it stops at the last pruning stage (the first
   decoder layer when unpruned) and runs the remaining layers and the LM head as one CUDA graph
   that writes their keys/values straight into the static buffers of step 2 (CLIP vision towers
   are replayed as graphs too). Graphs are kept per input shape and replayed by later calls.
2. **Static buffers**: each decoder layer gets a preallocated KV buffer
   ``[B, Hkv, N_l + T, D]`` (``N_l`` = that layer's prefill length after pruning, ``T`` = new
   tokens), the prefill keys/values copied in. Padding and pruned-away slots are never attended:
   each group of layers sharing a layout has a per-sample kept-index list ``[B, N_l + T]`` (the
   valid prefill slots in order, then the slots of the tokens to come) and a kept count
   ``[B]`` that grows by one per step. Counts are ragged across the batch.
3. **Decode steps** run the model's own decoder layers on one token per sample, with the
   attention implementation of every attention module swapped (on a private config copy) to
   :func:`vtoken.kernels.gather_attend` over the buffers, and a cache object that writes the new
   key/value into slot ``N_l + t``. Every shape is static and no step syncs with the host, so the
   whole step (embedding -> layers -> lm head -> argmax) is captured once in a CUDA graph and
   replayed.

Positions: a new token's position is the sample's largest prefill position + 1 + t (for 1-D RoPE
and for Qwen's M-RoPE, where the three components of a generated token are equal); pruning never
changes it (original positions, docs/DESIGN.md section 3).

Decoding is greedy (argmax, no logits processors), which is what ``model.generate(do_sample=False)``
does with a default generation config; finished rows are padded after their EOS as ``generate``
does, and the output stops when every row has finished. Sampling, beams, and multi-turn
continuation stay on ``model.generate``.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Optional

import torch

from vtoken.adapters import get_adapter
from vtoken.adapters.base import visual_token_ids
from vtoken.errors import PruningConfigError
from vtoken.hooks.handle import HANDLE_ATTR
from vtoken.hooks.probe import private_attention_config
from vtoken.hooks.runtime import STATE_ATTR

STATIC_IMPL = "vtoken_static"


# ------------------------------------------------------------------------------------ attention
def _static_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention implementation used inside decode steps: ``query [B, H, 1, D]`` over the layer's
    static buffers ``key``/``value`` ``[B, Hkv, L, D]`` read through its kept-index list."""
    from vtoken.kernels import gather_attend

    decoder = module.config._vtoken_static
    group = decoder.groups[decoder.layer_group[module.layer_idx]]
    out = gather_attend(query, key, value, group.idx, group.count, scale=scaling, backend=decoder.backend)
    return out.transpose(1, 2), None


def _register() -> None:
    from vtoken.hooks.probe import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if STATIC_IMPL not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(STATIC_IMPL, _static_attention)


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


# ------------------------------------------------------------------------------------ decoder
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
                torch.cuda.synchronize()
                return self.forward(*args, **kwargs)
            entry = self.graphs[key] = (graph, static, box)
        graph, static, box = entry
        _copy_into(static, (args, kwargs))
        graph.replay()
        return box["out"]


class _StopPrefill(Exception):
    """Raised by a pre-hook on the first layer of the captured tail: carries that layer's inputs."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict):
        super().__init__("vtoken: prefill continues in a captured graph")
        self.hidden, self.kwargs = hidden, kwargs


class _PrefillWriter:
    """The cache the captured prefill tail's layers see: writes a layer's prefill keys/values into
    slots ``[0, n)`` of its static buffers and returns those slots."""

    def __init__(self, kv: StaticKV):
        self.kv = kv

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n = key_states.shape[2]
        k, v = self.kv.keys[layer_idx][:, :, :n], self.kv.values[layer_idx][:, :, :n]
        k.copy_(key_states)
        v.copy_(value_states)
        return k, v


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
    decode_graph: object = None
    tail_inputs: Optional[dict] = None
    tail_logits: Optional[torch.Tensor] = None
    tail_graph: object = None


class StaticDecoder:
    """Greedy generation with static KV buffers, kept-index lists and (on CUDA) CUDA graphs.

    ``StaticDecoder(model).generate(**inputs, max_new_tokens=T)`` returns what
    ``model.generate(**inputs, max_new_tokens=T, do_sample=False)`` returns (prompt ids followed
    by the new tokens, ``[B, N + T']``), with or without a :func:`vtoken.apply_pruning` handle on
    the model. After a call, :attr:`last` holds ``prefill_ms``, ``setup_ms``, ``capture_ms``,
    ``decode_ms_per_token`` (CUDA-synchronised when ``timing=True``), ``kv_bytes`` (the static
    buffers), ``prefill_lengths`` (each layer group's prefill KV length) and whether graphs ran.

    Graph prefill (``graph_prefill``, default on with ``cuda_graph``): the prefill runs eagerly up
    to the last pruning stage (vision tower, the full-length layers, scoring and the gather; with
    no handle: up to the first decoder layer), and the remaining layers, the final norm and the
    LM head run as one CUDA graph writing their keys/values straight into the static buffers. The
    graphs and buffers are kept for the next call with the same shapes (serving engines capture
    per shape bucket the same way); the first call of a shape pays the capture (``capture_ms``).

    Args:
        model: a supported VLM (see :func:`vtoken.adapters.supported_models`).
        backend: ``gather_attend``'s backend: ``"auto"`` (Triton on CUDA), ``"triton"``, ``"torch"``.
        cuda_graph: capture the decode step in a CUDA graph (default: when the model is on CUDA).
        graph_prefill: split the prefill as above (default: as ``cuda_graph``). On the CPU
            ``graph_prefill=True`` runs the same split without graphs (what the tests check).
        fused_ops: run the decode step's layers with fused element-wise kernels
            (:mod:`vtoken.engine.fused_decode`; Llama-layout layers only, else a clear error).
            Exactly the model's arithmetic with the PyTorch references; with the Triton kernels the
            norms and the gate may differ by one bfloat16 rounding step.
    """

    def __init__(self, model, *, backend: str = "auto", cuda_graph: Optional[bool] = None,
                 graph_prefill: Optional[bool] = None, fused_ops: bool = False):
        self.model = model
        self.adapter = get_adapter(model)
        self.backend = backend
        self.cuda_graph = cuda_graph
        self.graph_prefill = graph_prefill
        cfg = self.adapter.text_config
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise PruningConfigError("StaticDecoder does not support sliding-window attention layers")
        self.fused_ops = bool(fused_ops)
        if self.fused_ops:
            from vtoken.engine.fused_decode import unsupported_reason

            reason = unsupported_reason(list(self.adapter.layers), self.adapter.text_model.norm, cfg)
            if reason is not None:
                raise PruningConfigError(f"fused_ops=True needs Llama-layout decoder layers; {reason}")
        self.groups: list = []
        self.layer_group: list = []
        self.last: dict = {}
        self._session: Optional[_Session] = None
        self._tower_graph: Optional[_GraphedForward] = None

    @property
    def _handle(self):
        """The :func:`vtoken.apply_pruning` handle attached to the model, or None."""
        return self.model.__dict__.get(HANDLE_ATTR)

    # -------------------------------------------------------------- prefill
    def _prefill(self, inputs: dict, stop: Optional[int] = None, graph_tower: bool = False):
        """Run the model's forward; with ``stop``, abort it at decoder layer ``stop`` (after the
        pruning hooks have re-laid-out its inputs); with ``graph_tower``, the vision tower's forward
        replays a CUDA graph per input shape. Returns (logits or None, position ids, cache, tail
        inputs or None)."""
        captured = {}
        rotary = self.adapter.text_model.rotary_emb

        def grab(module, args, kwargs):
            pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            captured.setdefault("pos", pos)

        def halt(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            raise _StopPrefill(hidden, kwargs)

        from transformers import DynamicCache

        params = inspect.signature(self.model.forward).parameters
        # an explicit cache object: the pruning runtime records the pruned layout on it
        kwargs = dict(inputs, use_cache=True, return_dict=True)
        cache = DynamicCache()
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = 1
        hooks = [rotary.register_forward_pre_hook(grab, with_kwargs=True)]
        if stop is not None:
            hooks.append(self.adapter.layers[stop].register_forward_pre_hook(halt, with_kwargs=True))
        tower = self.adapter.vision_tower if graph_tower else None
        if tower is not None:
            if self._tower_graph is None:
                self._tower_graph = _GraphedForward(tower, lambda fn: self._capture(fn, inputs["input_ids"].device))
            tower.forward = self._tower_graph
        logits, tail = None, None
        try:
            logits = self.model(**kwargs).logits[:, -1]
        except _StopPrefill as stopped:
            tail = {"hidden": stopped.hidden, "mask": stopped.kwargs.get("attention_mask"),
                    "position_embeddings": stopped.kwargs["position_embeddings"]}
        finally:
            for h in hooks:
                h.remove()
            if tower is not None:
                tower.__dict__.pop("forward", None)
        if captured.get("pos") is None:
            raise PruningConfigError("StaticDecoder could not read the prefill's position ids")
        return logits, captured["pos"], cache, tail

    def _needs_vision(self) -> bool:
        """Whether the attached plan reads vision-encoder attention, required or optional (captured
        by Python probes inside the tower, which a graph replay would skip)."""
        handle = self._handle
        return bool(handle is not None and (handle.runtime.needs_vision or handle.runtime.vision_probed))

    def _stop_layer(self) -> Optional[int]:
        """First layer of the captured prefill tail, or None when the split does not apply."""
        handle = self._handle
        stop = handle.plan[-1].layer if handle is not None else 0
        deepstack = getattr(getattr(self.model.config, "vision_config", None), "deepstack_visual_indexes", None)
        if deepstack and stop < len(deepstack):  # Qwen3-VL adds vision features inside those layers
            return None
        return stop if stop < len(self.adapter.layers) else None

    def _layer_valid(self, cache, mask2d: torch.Tensor) -> tuple:
        """Per layer group: the prefill layout's validity ``[b, N_g]``; and layer -> group."""
        handle = self._handle
        state = getattr(cache, STATE_ATTR, None)
        n_layers = len(self.adapter.layers)
        if handle is None or state is None:
            return [mask2d], [0] * n_layers
        layer_stage = handle.runtime.layer_stage  # stage index whose layout a layer sees, -1 before
        if len(state.stages) != len(handle.plan):
            raise RuntimeError(f"the pruned prefill recorded {len(state.stages)} stages of {len(handle.plan)}")
        return [mask2d] + [s.valid for s in state.stages], [layer_stage[i] + 1 for i in range(n_layers)]

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

    # -------------------------------------------------------------- captured pieces
    def _layer_call(self):
        params = inspect.signature(self.adapter.layers[0].forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"

        def call(layer, h, mask, pe, cache):
            h = layer(h, attention_mask=mask, position_embeddings=pe, use_cache=True, **{cache_kw: cache})
            return h[0] if isinstance(h, tuple) else h

        return call

    def _make_tail(self, session: _Session, stop: int):
        """The prefill tail closure: layers ``stop..`` on the session's static tail inputs, writing
        KV into the static buffers; final norm + LM head of the last slot into ``tail_logits``."""
        text, head = self.adapter.text_model, self.model.get_output_embeddings()
        layers = list(self.adapter.layers)[stop:]
        call = self._layer_call()
        writer = _PrefillWriter(session.kv)
        inp = session.tail_inputs

        def tail():
            h = inp["hidden"]
            for layer in layers:
                h = call(layer, h, inp["mask"], inp["position_embeddings"], writer)
            session.tail_logits.copy_(head(text.norm(h)[:, -1]))

        return tail

    def _make_step(self, session: _Session):
        """The decode step closure: reads ``tok [B, 1]`` and step ``t [1]``; writes token t+1 into
        ``new``."""
        model, adapter = self.model, self.adapter
        head = model.get_output_embeddings()
        text = adapter.text_model
        layers = list(adapter.layers)
        call = self._layer_call()
        kv, tok, t, out, pos_next = session.kv, session.tok, session.t, session.new, session.pos_next
        suppress = session.suppress
        groups = kv.groups
        fused, backend = self.fused_ops, self.backend
        if fused:
            from vtoken.engine.fused_decode import run_layers

        def step():
            for g in groups:
                g.slot.copy_(t + g.n_prefill)
                torch.add(g.base, t.to(g.base.dtype) + 1, out=g.count)
            h = adapter.decode_embeddings(tok)
            pe = text.rotary_emb(h, adapter.decode_position_ids(pos_next + t))
            if fused:
                logits = head(run_layers(layers, text.norm, h, pe, kv, groups, kv.layer_group, backend)[:, -1])
            else:
                for layer in layers:
                    h = call(layer, h, None, pe, kv)
                logits = head(text.norm(h)[:, -1])
            if suppress is not None:
                logits.index_fill_(1, suppress, float("-inf"))
            nxt = logits.argmax(-1)
            out.index_copy_(1, t + 1, nxt.unsqueeze(1))
            tok.copy_(nxt.unsqueeze(1))
            t.add_(1)

        return step

    def _swap_attention(self) -> list:
        _register()
        undo = []
        for layer in self.adapter.layers:
            attn = layer.self_attn
            undo.append((attn, attn.config))
            attn.config = private_attention_config(attn.config, STATIC_IMPL, _vtoken_static=self)
        return undo

    @staticmethod
    def _capture(fn, dev, warmups: int = 1):
        """Warm ``fn`` up on a side stream (Triton compilation, cuBLAS workspaces), then capture it."""
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmups):
                fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.cuda.graph(graph):
            fn()
        return graph

    def _session_for(self, signature: tuple, kv: StaticKV, batch: int, new_tokens: int, pad: int, dev,
                     suppress: Optional[torch.Tensor], reuse: bool) -> _Session:
        """The session for ``signature`` (the cached one when it matches; every tensor a captured
        graph reads must live here, not in a call's locals, or a replay reads freed memory)."""
        if reuse and self._session is not None and self._session.signature == signature:
            return self._session
        session = _Session(signature=signature, kv=kv, tok=torch.zeros(batch, 1, dtype=torch.long, device=dev),
                           t=torch.zeros(1, dtype=torch.long, device=dev),
                           new=torch.full((batch, new_tokens), pad, dtype=torch.long, device=dev),
                           pos_next=torch.zeros(batch, dtype=torch.long, device=dev), suppress=suppress)
        self._session = session if reuse else None
        return session

    # -------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, max_new_tokens: int = 16, eos_token_id=None, pad_token_id=None, suppress_tokens=None,
                 prefill_batch: Optional[int] = None, timing: bool = False, **inputs) -> torch.Tensor:
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise PruningConfigError("StaticDecoder.generate needs input_ids")
        if max_new_tokens < 1:
            raise PruningConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prefill_batch is not None and (not isinstance(prefill_batch, int) or prefill_batch < 1):
            raise PruningConfigError(f"prefill_batch must be a positive int or None, got {prefill_batch!r}")
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None)
        pad = pad_token_id if pad_token_id is not None else getattr(gen_cfg, "pad_token_id", None)
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        dev = input_ids.device
        if self.cuda_graph and dev.type != "cuda":
            raise PruningConfigError(f"cuda_graph=True needs a model on a CUDA device; the inputs are on {dev}")
        use_graph = self.cuda_graph if self.cuda_graph is not None else dev.type == "cuda"
        sync = (lambda: torch.cuda.synchronize(dev)) if (timing and dev.type == "cuda") else (lambda: None)
        B, T = input_ids.shape[0], max_new_tokens
        mask2d = inputs.get("attention_mask")
        mask2d = torch.ones_like(input_ids, dtype=torch.bool) if mask2d is None else mask2d.bool()
        chunk = B if not prefill_batch else prefill_batch
        if chunk < B:
            _check_same_visual_inputs(self.model.config, input_ids)
        split = (self.graph_prefill if self.graph_prefill is not None else use_graph) and chunk >= B
        stop = self._stop_layer() if split else None
        graphs = dev.type == "cuda" and use_graph
        suppress = None if not suppress_tokens else torch.tensor(list(suppress_tokens), dtype=torch.long, device=dev)
        like = next(self.adapter.text_model.parameters())

        sync(); t0 = time.perf_counter()
        capture_ms = 0.0
        kv, session, firsts, nexts = None, None, [], []
        for start in range(0, B, chunk):
            rows = slice(start, min(B, start + chunk))
            part = inputs if rows.stop - rows.start == B else _slice_inputs(inputs, rows, B)
            logits, prefill_pos, cache, tail = self._prefill(part, stop, graph_tower=graphs and stop is not None
                                                             and self.adapter.vision_tower_graphable
                                                             and not self._needs_vision())
            # a generated token's position: the sample's largest prefill position + 1 (+ t)
            pos = prefill_pos.to(dev)
            pos = pos.amax(dim=0) if pos.dim() == 3 else pos
            nexts.append((pos.amax(dim=-1) + 1).expand(rows.stop - rows.start))
            valids, layer_group = self._layer_valid(cache, mask2d[rows])
            if tail is None:
                kv = self._store_chunk(kv, cache, valids, layer_group, rows, B, T, like)
            else:
                signature = (B, T, tuple(v.shape[1] for v in valids), stop, tuple(tail["hidden"].shape),
                             None if tail["mask"] is None else (tuple(tail["mask"].shape), tail["mask"].dtype),
                             tuple(tail["position_embeddings"][0].shape), None if suppress is None else
                             tuple(suppress.tolist()), like.dtype, str(dev), self.backend)
                reused = self._session is not None and self._session.signature == signature
                kv0 = self._session.kv if reused else self._allocate(B, [v.shape[1] for v in valids], layer_group,
                                                                     T, like)
                kv0.valid_rows = [[] for _ in valids]
                kv = self._store_chunk(kv0, cache, valids, layer_group, rows, B, T, like, upto=stop)
                session = self._session_for(signature, kv, B, T, pad, dev, suppress, reuse=graphs)
                if session.tail_inputs is None:
                    session.tail_inputs = {
                        "hidden": tail["hidden"].clone(),
                        "mask": None if tail["mask"] is None else tail["mask"].clone(),
                        "position_embeddings": tuple(p.clone() for p in tail["position_embeddings"]),
                    }
                    session.tail_logits = like.new_empty(B, self.model.get_output_embeddings().out_features)
                else:
                    inp = session.tail_inputs
                    inp["hidden"].copy_(tail["hidden"])
                    if inp["mask"] is not None:
                        inp["mask"].copy_(tail["mask"])
                    for dst, src in zip(inp["position_embeddings"], tail["position_embeddings"]):
                        dst.copy_(src)
                run_tail = self._make_tail(session, stop)
                if graphs and session.tail_graph is None:
                    c0 = time.perf_counter()
                    session.tail_graph = self._capture(run_tail, dev)
                    capture_ms += 1000 * (time.perf_counter() - c0)
                if graphs:
                    session.tail_graph.replay()
                else:
                    run_tail()
                logits = session.tail_logits
            if suppress is not None:
                logits = logits.index_fill(1, suppress, float("-inf"))
            firsts.append(logits.argmax(-1))
            if start == 0:
                sync(); t1 = time.perf_counter()
            del cache, tail
        self._finish_buffers(kv, B, T, dev)
        first = torch.cat(firsts)
        if session is None:
            session = self._session_for(None, kv, B, T, pad, dev, suppress, reuse=False)
        session.pos_next.copy_(torch.cat(nexts))
        session.tok.copy_(first.unsqueeze(1))
        session.t.zero_()
        session.new.fill_(pad)
        session.new[:, 0] = first
        step = self._make_step(session)
        sync(); t2 = time.perf_counter()

        undo = self._swap_attention()
        try:
            if T > 1 and use_graph:
                if session.decode_graph is None:
                    c0 = time.perf_counter()
                    session.decode_graph = self._capture(step, dev, warmups=2)
                    session.t.zero_()
                    session.tok.copy_(first.unsqueeze(1))
                    sync()
                    capture_ms += 1000 * (time.perf_counter() - c0)
                t3 = time.perf_counter()
                for _ in range(T - 1):
                    session.decode_graph.replay()
            else:
                t3 = time.perf_counter()
                for _ in range(T - 1):
                    step()
            sync(); t4 = time.perf_counter()
        finally:
            for attn, original in undo:
                attn.config = original
        new = _finish(session.new.clone(), eos_ids, pad)
        self.last = dict(
            prefill_ms=1000 * (t1 - t0), setup_ms=1000 * (t2 - t1), capture_ms=capture_ms, prefill_chunks=len(firsts),
            decode_ms_per_token=1000 * (t4 - t3) / (T - 1) if T > 1 else None,
            kv_bytes=kv.nbytes, prefill_lengths=[g.n_prefill for g in self.groups],
            cuda_graph=bool(use_graph and T > 1), graph_prefill_from_layer=stop if split else None,
            vision_tower_graph=None if self._tower_graph is None else (self._tower_graph.failed or "captured"),
            fused_ops=self.fused_ops,
        )
        return torch.cat([input_ids, new], dim=1)


def _release_layer(cache, layer: int) -> None:
    """Drop one layer's tensors from a dynamic cache (its copy now lives in the static buffers)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        layers[layer].keys = layers[layer].values = None


def _slice_inputs(inputs: dict, rows: slice, batch: int) -> dict:
    """Rows ``rows`` of a batch of processor outputs, for chunked prefill. Per-sample tensors
    (first axis == batch) are sliced directly; per-image / per-patch tensors only when every sample
    carries the same visual inputs (their first axis splits evenly, and grids are identical)."""
    out = {}
    n = rows.stop - rows.start
    for key, value in inputs.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            out[key] = value
            continue
        if key.endswith("grid_thw") and not bool((value == value[:1]).all()):
            raise PruningConfigError(f"prefill_batch needs the same {key} for every sample")
        first = value.shape[0]
        if first % batch:
            raise PruningConfigError(
                f"prefill_batch needs per-sample inputs that split evenly; {key} has {first} rows for {batch} samples"
            )
        per = first // batch
        out[key] = value[rows.start * per: rows.start * per + n * per]
    return out


def _check_same_visual_inputs(config, input_ids: torch.Tensor) -> None:
    for tok in visual_token_ids(config):
        per_row = (input_ids == tok).sum(1)
        if not bool((per_row == per_row[0]).all()):
            raise PruningConfigError(
                f"prefill_batch needs every sample to carry the same visual inputs; counts of token {tok} per "
                f"sample: {per_row.tolist()}"
            )


def _finish(new: torch.Tensor, eos_ids: list, pad: int) -> torch.Tensor:
    """As ``generate``: tokens after a row's first EOS become ``pad``; stop once every row ended."""
    if not eos_ids:
        return new
    is_eos = torch.zeros_like(new, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= new == e
    ended_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    new = new.masked_fill(ended_before, pad)
    done = is_eos.any(1)
    if bool(done.all()):
        length = int((is_eos.long().argmax(1) + 1).max())
        new = new[:, :length]
    return new
