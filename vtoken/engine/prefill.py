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
from vtoken.engine.graphs import _GraphedForward, _Session
from vtoken.engine.static_kv import StaticKV
from vtoken.errors import PruningConfigError
from vtoken.hooks import handle_of


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
