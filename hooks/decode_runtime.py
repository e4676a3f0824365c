"""The runtime of a decode-time plan (:class:`vtoken.plan.DecodeStage`): evict or merge visual KV
entries of the dynamic cache during ``generate``.

Life of a call:

1. prefill (the forward with the images, on a dynamic cache): the model runs as without vtoken;
   the text-model pre-hook reads the visual layout (the adapter) and leaves a
   :class:`DecodeState` on the cache (``DECODE_ATTR``); the attention probes of the layers a stage
   prunes fold every prompt query's attention row into per-layer running scores
   (:meth:`vtoken.scorers.decode.DecodeScorer.accumulate`, ``chunk`` rows at a time, never N x N).
2. each decode step: before the layers run, every stage whose ``step`` has come prunes its layers
   (:meth:`DecodeRuntime.evict`): per image the scorer keeps ``keep`` visual entries, the others are
   merged (merge mode) and removed from the layer's key / value tensors, each sample's kept slots
   re-laid-out with new padding on the left (a batch's samples keep different counts); the layer's
   layout (original position and validity per slot) is recorded. In ``"quantize"`` mode the
   evicted entries move to a low-bit store on the layer (:class:`LowBitKV`), dequantised in front
   of the layer's own keys / values each time its attention reads them. While a stage is still to come,
   the probes add the step's attention rows to the scores (or, for a scorer that ``reads_query``
   such as LazyLLM's, keep the layer's last query). A ``readmit`` stage ranks the layer's live
   entries with those an earlier one evicted, kept off the live cache, in original position order
   (:mod:`vtoken.hooks.decode_readmit`), and re-admitted entries go back at their slot order.
3. every decode step after an eviction: each layer gets a mask built from its own layout plus the
   tokens appended since (:func:`vtoken.hooks.masks.extend_mask`); ``cache.get_seq_length(layer)``
   reports the original (unpruned) length, so positions keep counting as without pruning.

A plan that also holds prefill stages (:class:`vtoken.plan.Stage`) attaches a
:class:`vtoken.hooks.runtime.Runtime` for them first: the layers after its stages start decoding
from its pruned layouts (the :class:`vtoken.hooks.call_state.PruneState` on the cache), their
prompt scores come from their pruned attention (the prefill runtime's layout), probes on a layer
both runtimes read chain (:func:`vtoken.hooks.probe.chain_probe`), and this runtime's masks, which cover every layer,
come last.

Not supported (refused with :class:`vtoken.errors.UnsupportedCallError`): ``use_cache=False``
(eviction is defined on a cache only: nothing to replay), fixed-slot caches (``StaticCache``,
``cache_implementation="static"``, :class:`vtoken.engine.StaticDecoder`), beam search (the cache's
rows are reordered), assisted decoding (the cache is cropped), new images into a pruned cache, a
visual prefill on a cache that already holds tokens (a cached prefix, chunked prefill). A prefill
whose evict / merge stages can evict nothing (every budget >= every image's count) records
nothing: the cache stays plain, and beam search or assisted decoding run as without vtoken.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from vtoken.errors import UnsupportedCallError
from vtoken.hooks import masks as M
from vtoken.hooks.call_state import CallContext
from vtoken.hooks.decode_record import DecodePrefill
from vtoken.hooks.decode_cache import (DECODE_ATTR, DecodeState, LayerLayout, LowBitKV, StashedKV,  # noqa: F401
                                       attach_low_bits, compact, patch_cache, take_slots, with_stash)
from vtoken.hooks.decode_readmit import readmit_stage
from vtoken.hooks.captures import eager
from vtoken.hooks.kv_cache import STATE_ATTR, cache_arg, fixed_slot_cache
from vtoken.hooks.probe import attention_rows, step_rows
from vtoken.hooks.runtime import open_multimodal_call
from vtoken.plan import tokens_for
from vtoken.scorers.decode_select import segment_selection, stage_eviction  # noqa: F401 - importable here as before


class DecodeRuntime:
    """Executes a plan of :class:`vtoken.plan.DecodeStage` on one model; one per handle. Offers the
    surface :class:`vtoken.hooks.handle.PruningHandle` and the adapters use (``plan``, ``tls``,
    ``layer_stage``, ``record_feature_lengths``, ``prune_deepstack``)."""

    #: prompt rows per probe computation at the prefill
    chunk: int = 256

    def __init__(self, adapter, plan, backend: str = "auto", prefill_runtime=None):
        #: the :class:`vtoken.hooks.runtime.Runtime` of the plan's prefill stages, if any: the layers
        #: after its stages start decoding from its pruned layouts
        self.prefill_runtime = prefill_runtime
        self.adapter = adapter
        self.plan = plan
        self.backend = backend
        self.num_layers = len(adapter.layers)
        self.layer_stage = [-1] * self.num_layers  # no prefill stage: every layer sees the prompt's layout
        self.stage_layers = []
        self.tls = threading.local()
        self.last_trace = self.last_meta = None
        self.attached = True
        self.needs_vision = self.wants_vision = self.vision_probed = False
        self.prefills_in_flight = 0
        self.stage_layer_sets = [tuple(range(self.num_layers)) if st.layers is None else st.layers for st in plan]
        self.probed_layers = sorted({l for st, ls in zip(plan, self.stage_layer_sets)
                                     if st.scorer.reads_attention or _reads_query(st.scorer) for l in ls})
        self.fast_readmit = all(st.readmit for st in plan)  # readmit stages only: hooks/decode_readmit.py

    # ---------------------------------------------------------------- the surface others use
    @property
    def ctx(self) -> Optional[CallContext]:
        return getattr(self.tls, "ctx", None)

    @property
    def session(self):
        return getattr(self.tls, "session", None)

    def discard_vision_captures(self) -> None:
        self.tls.vision = []

    @eager
    def record_feature_lengths(self, kind: str, lengths: list) -> None:
        ctx = self.ctx
        if ctx is not None:
            ctx.feature_lengths[kind] = lengths

    def prune_deepstack(self, visual_pos_masks, visual_embeds):
        return visual_pos_masks, visual_embeds  # the prefill is the plain model's

    def attn_impl(self) -> str:
        return self.adapter.text_config._attn_implementation or "eager"

    # ---------------------------------------------------------------- hook bodies
    @eager
    def on_multimodal_call(self, kwargs: dict) -> None:
        self.tls.ctx = open_multimodal_call(self, kwargs)[0]

    @eager
    def on_multimodal_done(self) -> None:
        self.tls.ctx = None

    @eager
    def on_text_call(self, kwargs: dict) -> None:
        ctx = self.ctx
        if ctx is None:  # language model called directly
            ctx = self.tls.ctx = CallContext()
        ctx.mode, ctx.span_masks, ctx.state = "off", None, None
        cache = cache_arg(kwargs)
        state = getattr(cache, DECODE_ATTR, None) if cache is not None else None
        embeds = kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else kwargs["input_ids"]
        B, q = ref.shape[:2]
        raw_mask = M.unwrap_mask(kwargs.get("attention_mask"))
        mask2d = M.key_validity(raw_mask)
        if raw_mask is not None and mask2d is None and (state is not None or ctx.visual_call):
            raise UnsupportedCallError(
                f"vtoken cannot read which tokens are padding from this attention_mask ({type(raw_mask).__name__}); "
                "pass a 2-D mask (batch, seq) or None")
        if state is not None:
            if ctx.visual_call:
                raise UnsupportedCallError(
                    "this KV cache holds a prompt whose visual entries a decode-time vtoken plan prunes; continuing it "
                    "with new images is not supported: start again without past_key_values")
            self._decode_step(ctx, cache, state, mask2d, B, q, ref.device)
            return
        if not ctx.visual_call or ctx.inputs is None:
            return  # no images in this forward (text only, or a cache vtoken did not prune)
        if all(st.mode in ("evict", "merge") and isinstance(st.keep, float) and st.keep >= 1.0
               and not _adaptive(st.scorer) for st in self.plan):
            return  # keep=1.0 everywhere: nothing can be evicted, the model's own on every path
        if cache is None:
            if self.session is not None:
                raise UnsupportedCallError(
                    "decode-time pruning (a plan of vtoken.DecodeStage, e.g. a2sf, lookm) evicts KV cache entries and "
                    "has no meaning without a cache: generate with use_cache=True (the default)")
            return  # a plain forward (no cache, no decoding): the model's own
        prefill_ctx = None if self.prefill_runtime is None else self.prefill_runtime.ctx
        if prefill_ctx is not None:  # the adapter's patches report visual feature lengths to that runtime
            ctx.feature_lengths = {**prefill_ctx.feature_lengths, **ctx.feature_lengths}
        layout = self.adapter.layout(ctx.inputs["input_ids"].cpu(), ctx.inputs, ctx)
        ctx.inputs = None
        if layout is None:
            return
        dev = ref.device
        orig_valid = mask2d[:, -q:].bool().to(dev) if mask2d is not None else torch.ones(B, q, dtype=torch.bool,
                                                                                          device=dev)
        structural = layout.structural
        if embeds is not None:
            refined = self.adapter.structural_from_embeds(embeds, layout)
            structural = refined if refined is not None else structural
        segment = layout.segment_of.to(dev).masked_fill(structural.to(dev) | ~orig_valid, -1)
        counts = torch.bincount(segment[segment >= 0], minlength=len(layout.seg_count)).tolist()
        budgets = [torch.tensor([tokens_for(st.keep, c) for c in counts], dtype=torch.long, device=dev)
                   for st in self.plan]
        seg_counts = torch.tensor(counts, dtype=torch.long, device=dev)
        if all(st.mode in ("evict", "merge") and not _adaptive(st.scorer) for st in self.plan) \
                and all(bool((b >= seg_counts).all()) for b in budgets):
            return  # no stage can evict anything: the cache stays plain (beam search, crop, re-selection work)
        if fixed_slot_cache(cache):
            raise UnsupportedCallError(
                f"decode-time pruning evicts entries from the dynamic KV cache; a {type(cache).__name__} (fixed slots, "
                "cache_implementation='static', compiled decoding) cannot shrink: use the default dynamic cache")
        if cache.get_seq_length() > 0:
            raise UnsupportedCallError(
                "a decode-time vtoken plan records the visual layout of the whole prompt at its prefill; this KV cache "
                "already holds tokens before the images (a cached text prefix, chunked prefill): run the prompt with "
                "its images in one forward on an empty cache (no past_key_values)")
        session = self.session
        if session is not None and session.prompt_len is not None and q > session.prompt_len:
            raise UnsupportedCallError(
                "assisted decoding (assistant_model / prompt_lookup_num_tokens) crops the KV cache, which a "
                "decode-time plan re-lays out: generate without an assistant")
        state = DecodeState(n_prefill=q, orig_valid=orig_valid, orig_all_valid=bool(orig_valid.all()),
                            segment=segment, budgets=budgets,
                            appended=torch.zeros(B, 0, dtype=torch.bool, device=dev))
        setattr(cache, DECODE_ATTR, state)
        patch_cache(cache, state, self)
        ctx.mode, ctx.state = "prefill", state
        ctx.key_valid = {layer: orig_valid for layer in self.probed_layers}

    def _decode_step(self, ctx, cache, state: DecodeState, mask2d, B: int, q: int, device) -> None:
        if state.extra == 0 and not state.layers:
            self._start_from_prefill_layouts(cache, state)
        while state.next < len(self.plan) and self.plan[state.next].step <= state.extra:
            self.evict(cache, state, state.next)
            state.next += 1
        if state.next >= len(self.plan):
            state.scores.clear()  # nothing left to rank (or to re-admit)
            state.queries.clear()
            state.stash.clear()
        new = mask2d[:, -q:].bool().to(device) if mask2d is not None else torch.ones(B, q, dtype=torch.bool,
                                                                                   device=device)
        state.appended = torch.cat([state.appended, new], dim=1)
        ctx.mode, ctx.state = "decode", state
        accumulating = state.next < len(self.plan)
        if not state.layers and not accumulating:
            return  # nothing pruned, nothing to rank: the model's own masks
        masks, ctx.key_valid, memo = {}, {}, {}
        impl, dtype = self.attn_impl(), next(self.adapter.text_model.parameters()).dtype
        for layer in range(self.num_layers):
            rec = state.layers.get(layer)
            key = None if rec is None else (id(rec.valid), rec.extra)
            if key not in memo:
                prefix = state.orig_valid if rec is None else rec.valid
                since = state.appended[:, (0 if rec is None else rec.extra):]
                all_valid = state.orig_all_valid if rec is None else rec.all_valid
                mask = M.extend_mask(prefix, since, q, impl, dtype, all_valid) if state.layers else None
                memo[key] = (mask, torch.cat([prefix, since], dim=1))
            masks[layer] = memo[key][0]
            if accumulating:
                ctx.key_valid[layer] = memo[key][1]
        ctx.span_masks = masks if state.layers else None

    def _start_from_prefill_layouts(self, cache, state: DecodeState) -> None:
        """The layers after a prefill stage of the same plan hold that stage's pruned layout
        (:class:`vtoken.hooks.call_state.PruneState` on the cache): decoding starts from it."""
        prune = getattr(cache, STATE_ATTR, None)
        if self.prefill_runtime is None or prune is None:
            return
        for layer in range(self.num_layers):
            i = self.prefill_runtime.layer_stage[layer]
            if 0 <= i < len(prune.stages):
                st = prune.stages[i]
                state.layers[layer] = LayerLayout(st.positions, st.valid, 0, st.all_valid)

    @eager
    def on_layer(self, layer: int, args: tuple, kwargs: dict):
        ctx = self.ctx
        if ctx is None or ctx.mode != "decode" or ctx.span_masks is None:
            return None
        kwargs["attention_mask"] = ctx.span_masks[layer]
        return args, kwargs

    def probe(self, layer: int):
        """The attention function of LLM layer ``layer``: the layer's own attention, and, while a
        stage that prunes this layer is still to come, its rows folded into the layer's scores."""

        def run(base, module, query, key, value, attention_mask, **kw):
            out = base(module, query, key, value, attention_mask, **kw)
            ctx = self.ctx
            state = None if ctx is None or ctx.mode == "off" else ctx.state
            stage = None if state is None else self.next_stage_of(state, layer)
            if stage is None:
                return out
            scorer = self.plan[stage].scorer
            scaling = kw.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
            with torch.no_grad():
                key_valid = ctx.key_valid[layer]
                prefill_ctx = None if self.prefill_runtime is None else self.prefill_runtime.ctx
                if ctx.mode == "prefill" and prefill_ctx is not None and prefill_ctx.relaid:
                    key_valid = prefill_ctx.cur_valid  # at / after a prefill stage that re-laid out this call
                if _reads_query(scorer):  # the last valid query row of each sample (the step's token in decode)
                    n = query.shape[2]
                    if ctx.mode == "prefill":
                        rank = key_valid[:, :n].long() * torch.arange(1, n + 1, device=query.device)
                        last = rank.argmax(dim=1)
                    else:
                        last = torch.full((query.shape[0],), n - 1, dtype=torch.long, device=query.device)
                    q_last = query.gather(2, last.view(-1, 1, 1, 1).expand(-1, query.shape[1], 1, query.shape[3]))
                    state.queries[layer] = (q_last.squeeze(2).detach(), scaling)
                elif ctx.mode == "prefill":
                    acc = state.scores.get(layer)
                    n = query.shape[2]
                    for start in range(0, n, self.chunk):
                        rows = torch.arange(start, min(start + self.chunk, n), device=query.device).expand(
                            query.shape[0], -1)
                        rows = rows.masked_fill(~key_valid.gather(1, rows), -1)
                        probs = attention_rows(query, key[:, :, :n], rows, key_valid, scaling).sum(dim=1)
                        acc = scorer.accumulate(acc, probs)
                    state.scores[layer] = acc
                else:
                    state.scores[layer] = scorer.accumulate(state.scores.get(layer),
                                                            step_rows(query, key, key_valid, scaling))
            return out

        return run

    def next_stage_of(self, state: DecodeState, layer: int) -> Optional[int]:
        """Index of the next stage still to run (``>= state.next``) that prunes ``layer``, or None:
        the layer's scores accumulate for that stage, with its scorer."""
        return self.pending_stage(state.next, layer)

    def pending_stage(self, done: int, layer: int) -> Optional[int]:
        """:meth:`next_stage_of` once the first ``done`` stages have run."""
        for i in range(done, len(self.plan)):
            if layer in self.stage_layer_sets[i]:
                scorer = self.plan[i].scorer
                return i if scorer.reads_attention or _reads_query(scorer) else None
        return None

    def prefill_record(self, cache) -> Optional[DecodePrefill]:
        """The :class:`DecodePrefill` of the prefill that filled ``cache`` (None: nothing recorded,
        i.e. nothing can be evicted, or no visual prefill), before any decode step ran."""
        state = getattr(cache, DECODE_ATTR, None)
        if state is None:
            return None
        if state.extra or state.next or state.layers:
            raise RuntimeError("this cache has already been decoded from: its prefill record is gone")
        return DecodePrefill(tuple(self.plan), tuple(self.stage_layer_sets), state.n_prefill, state.segment,
                             tuple(state.budgets), dict(state.scores))

    def accumulating_layers(self, done: int) -> dict:
        """layer -> the scorer whose scores the layer accumulates once the first ``done`` stages
        have run (a stage still to come prunes it and ranks by attention), as :meth:`probe` does."""
        stages = {layer: self.pending_stage(done, layer) for layer in range(self.num_layers)}
        return {layer: self.plan[i].scorer for layer, i in stages.items() if i is not None}

    def readmits_later(self, index: int, layer: int) -> bool:
        """Whether a stage after ``index`` re-admits stashed entries of ``layer``."""
        return any(self.plan[j].readmit and layer in self.stage_layer_sets[j] for j in range(index + 1, len(self.plan)))

    # ---------------------------------------------------------------- eviction
    def layer_layout(self, state: DecodeState, layer: int) -> tuple:
        """(positions (B, L), valid (B, L)) of the slots ``layer`` holds now (original position,
        -1 padding)."""
        rec = state.layers.get(layer)
        n, e = state.n_prefill, state.extra
        if rec is None:
            base = torch.arange(n, device=state.orig_valid.device).expand(state.orig_valid.shape[0], -1)
            pos, valid, since = base.masked_fill(~state.orig_valid, -1), state.orig_valid, 0
        else:
            pos, valid, since = rec.positions, rec.valid, rec.extra
        tail_valid = state.appended[:, since:e]
        tail = (n + since + torch.arange(e - since, device=pos.device)).expand(pos.shape[0], -1)
        return torch.cat([pos, tail.masked_fill(~tail_valid, -1)], 1), torch.cat([valid, tail_valid], 1)

    def evict(self, cache, state: DecodeState, index: int) -> None:
        """Run stage ``index`` on every layer it prunes (see the module docstring); a ``readmit``
        stage merges the layer's stash (or, ``fast_readmit``, reads its candidate buffer)."""
        stage, budget = self.plan[index], state.budgets[index]
        if stage.readmit and self.fast_readmit:
            return readmit_stage(self, cache, state, index)
        scorer, record, shared, reference = stage.scorer, {}, [], None
        if getattr(scorer, "reads_layout", False):  # e.g. MustDrop's output-aware policy: the output layer's slots
            ref_pos, ref_valid = self.layer_layout(state, scorer.reference_layer % self.num_layers)
            reference = ref_pos.masked_fill(~ref_valid, -1)
        for layer in self.stage_layer_sets[index]:
            kv = cache.layers[layer]
            pos, valid = self.layer_layout(state, layer)
            B, live = pos.shape
            if kv.keys.shape[2] != live:
                raise RuntimeError(f"layer {layer} caches {kv.keys.shape[2]} slots, its layout {live}")
            keys, values = kv.keys, kv.values
            stash = state.stash.pop(layer, None) if stage.readmit else None
            if stash is not None:  # candidates: the stashed and the live entries, in original position order
                pos, valid, keys, values = with_stash(stash, pos, valid, keys, values)
            L = pos.shape[1]
            if _reads_query(scorer):
                last = state.queries.get(layer)
                scores = torch.zeros(B, L, device=pos.device) if last is None else \
                    scorer.score_from_query(last[0], keys, valid, last[1])
            elif reference is not None:
                scores = scorer.score_from_layout(pos, reference)
            else:
                scores = state.scores.get(layer)
            evicted = stage_eviction(scorer, state.segment, pos, scores, budget)
            record[layer] = evicted
            if not bool(evicted.any()) and stash is None:
                continue
            kept = valid & ~evicted
            if stage.mode == "merge":
                keys, values = scorer.merge(keys, values, kept, evicted)
            if stage.mode == "quantize":  # the evicted entries live on at stage.bits bits, read first
                low, low_valid = compact(evicted)
                store = LowBitKV(take_slots(keys, low, low_valid), take_slots(values, low, low_valid), stage.bits)
                attach_low_bits(kv, store)
            if stage.readmit and self.readmits_later(index, layer) and bool(evicted.any()):
                out, out_valid = compact(evicted)
                state.stash[layer] = StashedKV(take_slots(keys, out, out_valid), take_slots(values, out, out_valid),
                                               pos.gather(1, out).masked_fill(~out_valid, -1), out_valid)
            take, new_valid = compact(kept)
            P = take.shape[1]
            kv.keys, kv.values = take_slots(keys, take, new_valid), take_slots(values, take, new_valid)
            positions, valid_slots = pos.gather(1, take).masked_fill(~new_valid, -1), new_valid
            if stage.mode == "quantize":
                positions = torch.cat([pos.gather(1, low).masked_fill(~low_valid, -1), positions], 1)
                valid_slots = torch.cat([low_valid, new_valid], 1)
            # layers whose slots have the same validity share one tensor: a decode step builds one mask for them
            same = next((v for v in shared if v.shape == valid_slots.shape and torch.equal(v, valid_slots)), None)
            if same is None:
                shared.append(valid_slots)
            else:
                valid_slots = same
            state.layers[layer] = LayerLayout(positions, valid_slots, state.extra, bool(valid_slots.all()))
            state.offsets[layer] = state.offsets.get(layer, 0) + live - P  # slots gone from (back to) the layer
            if layer in state.scores:
                state.scores[layer] = scores.gather(1, take).masked_fill(~new_valid, 0)
        state.evicted.append(record)


def _reads_query(scorer) -> bool:
    return bool(getattr(scorer, "reads_query", False))


def _adaptive(scorer) -> bool:
    """The scorer decides the kept count (``keep`` caps it): a full budget may still evict."""
    return bool(getattr(scorer, "adaptive", False))
