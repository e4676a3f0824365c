"""The prefill of :class:`~vtoken.engine.StaticDecoder`: the model's own forward, optionally split.

- ``_Prefill``: the decoder's prefill methods, a mixin of ``StaticDecoder`` (it reads
  ``self.model``, ``self.adapter``, ``self._tower_graph``, ``self._capture`` and
  ``self._layer_call``). ``_prefill`` runs the forward with a dynamic cache, reads the position
  ids, and with a stop layer aborts at it (``_StopPrefill``, after the pruning hooks have
  re-laid-out its inputs) so that the remaining layers run as the captured tail (``_make_tail``,
  writing KV straight into the static buffers through ``_PrefillWriter``); ``_stop_layer`` picks
  that layer, ``_layer_valid`` reads each layer group's pruned layout through the handle.
- ``_slice_inputs`` / ``_check_same_visual_inputs``: splitting a batch into prefill chunks
  (``prefill_batch``).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch

from vtoken.adapters.base import visual_token_ids
from vtoken.engine.fused_decode import prefill_tail_supported, run_prefill_layers
from vtoken.engine.graphs import _clone, _copy_into, _GraphedForward, _Session, _signature, capture
from vtoken.engine.static_kv import _cache_layer_kv, _restore_layer, StaticKV
from vtoken.errors import PruningConfigError
from vtoken.hooks import handle_of


#: captured prefill heads a decoder keeps (one per prompt layout; the least recently used goes first)
HEAD_GRAPHS = 8


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


class _Prefill:
    """:class:`~vtoken.engine.StaticDecoder`'s prefill methods (see the module docstring)."""

    @property
    def _handle(self):
        """The :func:`vtoken.apply_pruning` handle attached to the model, or None."""
        return handle_of(self.model)

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

    def _run_prefill(self, inputs: dict, stop: Optional[int], graphs: bool):
        """``_generate``'s prefill: with graphs and a split, the head replayed as a graph where
        ``graph_prefill="all"`` allows and it can be captured (:meth:`_graphed_head`), else
        :meth:`_prefill` with the vision tower's graph where the tower allows."""
        self.head_graph = None
        if not graphs or stop is None or self._needs_vision():
            return self._prefill(inputs, stop)
        out = self._graphed_head(inputs, stop) if self.graph_prefill == "all" else None
        return out if out is not None else self._prefill(inputs, stop, graph_tower=self.adapter.vision_tower_graphable)

    def _graphed_head(self, inputs: dict, stop: int) -> Optional[tuple]:
        """:meth:`_prefill` up to layer ``stop`` (the vision tower, the layers before it, the
        scoring and the gather) replayed as one graph per prompt layout, or None where it cannot be
        captured (``self.head_graph`` says why; that layout then runs eagerly). A replay runs no
        Python: what the head decides on the host — where the visual tokens are, the padding, the
        integer inputs such as image sizes — is the graph's key (read from host copies the head is
        given: :meth:`~vtoken.hooks.PruningHandle.host_inputs`), and the outputs are the capture's
        tensors, rewritten by each replay (a scorer's budget checks run at the capture only: its
        kept counts are the graph's shapes; the handle's ``prefills`` and ``stats`` are left as the
        capture set them: a replay runs no hook). Each graph holds its own memory pool (the head's
        activations); at most :data:`HEAD_GRAPHS` are kept."""
        handle = self._handle
        dev = inputs["input_ids"].device
        ids_host = inputs["input_ids"].to("cpu", copy=True)
        mask = inputs.get("attention_mask")
        mask_host = torch.ones_like(ids_host, dtype=torch.bool) if mask is None else mask.to("cpu", copy=True).bool()
        weights = next(self.model.parameters())  # (moved or cast weights: another graph)
        state = (getattr(self.adapter.text_config, "_attn_implementation", None), torch.is_autocast_enabled(),
                 weights.data_ptr(), weights.dtype)
        key = (state, *_head_key(self.model.config, handle, stop, inputs, ids_host, mask_host))
        if key in self._heads:
            self._heads[key] = self._heads.pop(key)  # the most recently used last
        elif len(self._heads) >= HEAD_GRAPHS:
            del self._heads[next(iter(self._heads))]
        entry = self._heads.get(key)
        if isinstance(entry, str):  # this layout's capture failed before: why
            self.head_graph = entry
            return None
        if entry is None:
            static, box = _clone(inputs), {}

            def head():  # (the host plans its graph reads stay with it: the plan cache may drop them)
                with contextlib.nullcontext([]) if handle is None else handle.host_inputs(ids_host, mask_host) as plans:
                    box["out"] = self._prefill(static, stop)
                box["plans"] = plans
            try:  # (the second warm-up checked for host reads, before a capture they would break)
                graph = capture(self.cuda_graph, head, dev, 2, host=(ids_host, mask_host), checked=True)
            except Exception as exc:  # noqa: BLE001 - not capturable (a host read inside): stay eager
                self.head_graph = self._heads[key] = f"{type(exc).__name__}: {exc}"
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                return None
            entry = self._heads[key] = (graph, static, box)
            self.head_graph = "captured"
        else:
            self.head_graph = "replayed"
        graph, static, box = entry
        _copy_into(static, inputs)
        graph.replay()
        cache = box["out"][2]  # the capture's cache: the layers before ``stop``, which _store_chunk releases
        for layer, (k, v) in enumerate(box.setdefault("kv", [_cache_layer_kv(cache, i) for i in range(stop)])):
            _restore_layer(cache, layer, k, v)
        return box["out"]

    def _drop_graphs(self) -> None:
        """Forget the kept session and the captured heads (their graphs read weights about to move)."""
        self._session = None
        self._heads.clear()

    def _deferred_checks(self):
        """The handle's :meth:`~vtoken.hooks.PruningHandle.deferred_checks`, or a null context."""
        handle = self._handle
        return contextlib.nullcontext() if handle is None else handle.deferred_checks()

    def _needs_vision(self) -> bool:
        """Whether the attached plan reads vision-encoder attention, required or optional (captured
        by Python probes inside the tower, which a graph replay would skip)."""
        handle = self._handle
        return bool(handle is not None and handle.reads_vision_encoder)

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
        layouts = handle.pruned_layouts(cache) if handle is not None else None
        n_layers = len(self.adapter.layers)
        if layouts is None:
            return [mask2d], [0] * n_layers
        layer_stage = handle.layer_stage  # stage index whose layout a layer sees, -1 before
        return [mask2d] + layouts, [layer_stage[i] + 1 for i in range(n_layers)]

    def _make_tail(self, session: _Session, stop: int):
        """The prefill tail closure: layers ``stop..`` on the session's static tail inputs, writing
        KV into the static buffers; final norm + LM head of the last slot into ``tail_logits``.
        With ``fused_ops`` (and one rotary table per token) the layers run with the decode step's
        fused element-wise kernels (:func:`vtoken.engine.fused_decode.run_prefill_layers`)."""
        text, head = self.adapter.text_model, self.model.get_output_embeddings()
        layers = list(self.adapter.layers)[stop:]
        call = self._layer_call()
        writer = _PrefillWriter(session.kv)
        inp = session.tail_inputs

        if self.fused_ops and prefill_tail_supported(inp["position_embeddings"]):
            def tail():  # the decode step's fused element-wise kernels around the model's projections
                h = run_prefill_layers(layers, text.norm, inp["hidden"], inp["mask"], inp["position_embeddings"],
                                       writer, self.backend, first=stop, projections=self._projections)
                session.tail_logits.copy_(head(h[:, -1]))

            return tail

        def tail():
            h = inp["hidden"]
            for layer in layers:
                h = call(layer, h, inp["mask"], inp["position_embeddings"], writer)
            session.tail_logits.copy_(head(text.norm(h)[:, -1]))

        return tail


def _head_key(config, handle, stop: int, inputs: dict, ids_host: torch.Tensor, mask_host: torch.Tensor) -> tuple:
    """What a captured head is replayed for (besides the model's attention implementation, autocast
    and weights): the handle and its plan, the stop layer, the inputs' shapes, where the visual
    tokens are, the padding, and the values of the other integer inputs."""
    visual = torch.isin(ids_host, torch.tensor(visual_token_ids(config), dtype=ids_host.dtype))
    ints = tuple((k, v.to("cpu").numpy().tobytes()) for k, v in sorted(inputs.items())
                 if torch.is_tensor(v) and not v.is_floating_point() and k not in ("input_ids", "attention_mask"))
    plan = None if handle is None else (id(handle), repr(handle.plan))
    return (plan, stop, _signature(inputs), visual.numpy().tobytes(), mask_host.numpy().tobytes(), ints)


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
