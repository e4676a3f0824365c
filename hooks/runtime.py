"""The pruning runtime: one per handle; its hook bodies run each call's pruning.

Life of a prefill (the forward that sees the images):

1. pre-hook on the multimodal model (:meth:`Runtime.on_multimodal_call`): a new
   :class:`~vtoken.hooks.call_state.CallContext`; with images, the inputs go to the host and the
   first stage is planned there when the adapter can lay out from the inputs alone
   (:mod:`vtoken.hooks.host_plans`).
2. pre-hook on the language model (:meth:`Runtime.on_text_call`): read the 2-D attention mask and
   the cache; locate the visual tokens (no visual tokens: pass through) and choose a mode:
   ``prefill`` (score and prune), ``replay`` (no-cache generation: re-apply the prompt's
   decisions), ``decode`` (the cache carries a pruned prefix: :func:`vtoken.hooks.masks.decode_step_masks`)
   or ``off``.
3. pre-hook on each decoder layer from the first stage on (:meth:`Runtime.on_layer`): at a stage
   layer, :func:`vtoken.hooks.stage.run_stage` (signals from :mod:`vtoken.hooks.stage_signals`,
   captured by the probes of :mod:`vtoken.hooks.captures`); every later layer receives the kept
   tokens' positions and a mask for the new layout.
4. decode steps: the cache of layers after a stage is shorter (:mod:`vtoken.hooks.kv_cache`);
   those layers receive a mask built from the pruned prefix's validity plus the new tokens.
   Positions come from ``generate`` (original, unpruned counting), so nothing else changes. Per
   step this costs one mask per stage and a dict lookup per layer.

State lives on the handle (thread-local per call) and on the KV cache object (the pruned
prefix's layout), never in module globals.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from vtoken.hooks import masks as M
from vtoken.hooks.call_state import CallContext, GenerateSession, PrefillMeta, PruneState
from vtoken.hooks.captures import eager, layer_probe, probe_rows, vision_probe
from vtoken.hooks.checkpointing import outside_recompute, recall, remember
from vtoken.hooks.deepstack import prune_deepstack
from vtoken.hooks.host_plans import may_drop, plan_at_text_call, plan_before_vision, plan_cache_for
from vtoken.hooks.kv_cache import (FIXED_ATTR, STATE_ATTR, FixedSlots, cache_arg, fixed_cache_problem,
                                   fixed_slot_cache, mark_fixed_passthrough, record_pruned_prefill,
                                   size_fixed_layer)
from vtoken.hooks.labels import follow_layout, private_labels
from vtoken.hooks.stage import check_budget, run_stage
from vtoken.signals import SIGNAL_NAMES, SIGNALS


def _reads_vision(scorer, which: str) -> bool:
    return any(SIGNALS[n].vision for n in getattr(scorer, which, frozenset()) if n in SIGNALS)


class Runtime:
    """Executes a plan on one model; one per handle. Holds the plan, the per-thread call context
    and generate session, and the hook bodies the handle installs."""

    #: run the first stage from the host plan (no syncs); False: the generic device path (tests)
    host_first_stage: bool = True
    #: host plans kept across calls (see PlanCache); 0 disables
    plan_cache_size: int = 32

    def __init__(self, adapter, plan, backend: str = "auto"):
        from vtoken.errors import PruningConfigError

        for st in plan:
            unknown = set(getattr(st.scorer, "needs", ())) - SIGNAL_NAMES
            if unknown:
                raise PruningConfigError(
                    f"scorer {st.scorer.name!r} needs {sorted(unknown)}, which are not signals vtoken provides "
                    f"(vtoken.signals.SIGNALS lists them)")
        self.adapter = adapter
        self.plan = plan
        self.backend = backend
        self.stage_layers = [st.layer for st in plan]
        self.num_layers = len(adapter.layers)
        self.first_layer = self.stage_layers[0]
        # index of the stage whose layout a layer sees (-1 before the first stage)
        self.layer_stage = [-1] * self.num_layers
        for i, L in enumerate(self.stage_layers):
            for layer in range(L, self.num_layers):
                self.layer_stage[layer] = i
        self.tls = threading.local()
        self.plans = plan_cache_for(adapter.model, self.plan_cache_size)
        self.last_trace = None
        self.last_meta = None
        self.probe_needs = probe_rows(plan)  # layer -> captures its probe records
        self.needs_vision = any(_reads_vision(st.scorer, "needs") for st in plan)
        #: a scorer reads vision-encoder attention only if the model provides it (``optional_needs``,
        #: e.g. FlowCut's relay): attach() installs the vision probe where the adapter has one
        self.wants_vision = any(_reads_vision(st.scorer, "optional_needs") for st in plan)
        #: set by attach() when the vision-encoder probe is installed (required or optional)
        self.vision_probed = False
        #: False once the handle is removed: a KV cache this runtime pruned cannot be continued
        #: by the plain model (its pruned layers are shorter), see vtoken.hooks.kv_cache
        self.attached = True
        #: prefills in flight on any thread: probes record only while one is (a traced decode step reads 0)
        self.prefills_in_flight = 0

    # ---------------------------------------------------------------- contexts
    @property
    def ctx(self) -> Optional[CallContext]:
        return getattr(self.tls, "ctx", None)

    @property
    def session(self) -> Optional[GenerateSession]:
        return getattr(self.tls, "session", None)

    @eager
    def record_feature_lengths(self, kind: str, lengths: list) -> None:
        """Called by adapters when the model computes visual features inside a forward."""
        ctx = self.ctx
        if ctx is not None:
            ctx.feature_lengths[kind] = lengths

    def attn_impl(self) -> str:
        return self.adapter.text_config._attn_implementation or "eager"

    def kernel_backend(self, tensor) -> str:
        if self.backend == "torch":
            return "torch"
        from vtoken.kernels import resolve_backend

        return resolve_backend(self.backend, tensor)  # "triton" on CUDA (or when forced), else "torch"

    def probe(self, layer: int):
        """The attention function the handle installs on probed LLM layer ``layer``."""
        return layer_probe(self, layer, self.probe_needs.get(layer, set()))

    def vision_probe(self):
        """The attention function the handle installs on the probed vision-encoder layer."""
        return vision_probe(self)

    # ---------------------------------------------------------------- hook bodies
    def discard_vision_captures(self) -> None:
        """Forget vision-encoder signals captured so far on this thread. Called where a new set of
        images starts (a forward that runs the vision tower, a ``generate`` call), so signals of an
        encoder run outside a pruned call (``model.model.get_image_features(...)`` for embeddings)
        never reach the next call's scorers."""
        self.tls.vision = []

    @eager
    def on_multimodal_call(self, kwargs: dict) -> None:
        ctx, kwargs, pixels = open_multimodal_call(self, kwargs)
        if ctx.inputs is not None and pixels:
            plan_before_vision(self, ctx, kwargs)
        self.tls.ctx = ctx

    @eager
    def on_model_call(self, names: list, args: tuple, kwargs: dict):
        """Pre-hook body of the whole model (the one that computes a loss from ``labels``): the call's
        labels become a private copy that follows the pruned layout (:mod:`vtoken.hooks.labels`)."""
        replaced = private_labels(names, args, kwargs)
        self.tls.labels = None if replaced is None else replaced[2]
        return None if replaced is None else replaced[:2]

    @eager
    def on_multimodal_done(self) -> None:
        ctx = self.ctx
        self.tls.ctx = None
        if ctx is None:
            return
        given = getattr(self.tls, "host_inputs", None)
        if given is not None and ctx.prepared is not None:  # kept by the caller (PruningHandle.host_inputs)
            given[2].append(ctx.prepared)
        labels, self.tls.labels = getattr(self.tls, "labels", None), None
        if labels is not None and ctx.relaid and ctx.mode in ("prefill", "replay"):
            follow_layout(labels, ctx.cur_pos)
        deferred = getattr(self.tls, "deferred_checks", None)
        if deferred is not None:  # an engine checks them where it waits for the device anyway
            deferred.extend(ctx.checks or ())
        else:
            for name, got, budget in ctx.checks or ():
                check_budget(name, got, budget)
        if ctx.mode == "prefill" and ctx.fixed is not None and ctx.state is not None:
            # from now on the cache's steps take the traced path (on_fixed_slot_step)
            setattr(ctx.fixed, FIXED_ATTR, FixedSlots([st.valid for st in ctx.state.stages]))
        if ctx.in_flight:
            self.prefills_in_flight -= 1
        if ctx.mode == "prefill" and ctx.trace:
            self.last_trace = ctx.trace
            self.last_meta = PrefillMeta(ctx.layout, ctx.prepared, ctx.orig_valid)
            self.tls.last = (ctx.trace, self.last_meta)
            self.tls.prefills = getattr(self.tls, "prefills", 0) + 1

    @eager
    def on_text_call(self, kwargs: dict) -> None:
        ctx = self.ctx
        if ctx is None:  # language model called directly: nothing to do
            ctx = self.tls.ctx = CallContext()
        embeds = kwargs.get("inputs_embeds")
        cache = cache_arg(kwargs)
        state = getattr(cache, STATE_ATTR, None) if cache is not None else None
        q = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        B = embeds.shape[0] if embeds is not None else kwargs["input_ids"].shape[0]
        # a 2-D padding mask, or the one a 4-D / dict mask implies (None: no mask, or unreadable)
        raw_mask = M.unwrap_mask(kwargs.get("attention_mask"))
        mask2d = M.key_validity(raw_mask)
        unreadable = raw_mask is not None and mask2d is None
        if mask2d is not None and state is None and mask2d.shape[1] > q:
            mask2d = mask2d[:, :q]  # a prefill's 4-D mask over a static cache's slots: the prompt's columns
        if unreadable and state is not None:
            _bad_mask(raw_mask)
        # a fixed-slot cache's later steps never reach here (FixedSlots: see on_fixed_slot_step)
        fixed = state is None and fixed_slot_cache(cache)
        if state is not None:
            ctx.mode = "decode"
            ctx.span_masks = M.decode_step_masks(state, mask2d, q, B, self.attn_impl(), self._dtype(), embeds.device)
            return
        session = self.session
        if not ctx.visual_call and (session is None or session.state is None):
            # no visual inputs in this forward (a decode step on a cache vtoken did not prune, a text-only
            # prompt): placeholder ids it may hold were generated as text, and nothing is pruned
            ctx.inputs, ctx.mode = None, "off"
            if fixed:  # a static cache's text-only prefill: its steps run as the plain model's, traced
                mark_fixed_passthrough(cache)
            return
        if ctx.inputs is not None:  # a prefill: this forward's vision captures belong to it
            ctx.vision = getattr(self.tls, "vision", None) or []
            self.tls.vision = []
        if not plan_at_text_call(self, ctx, embeds, mask2d, B, q):
            ctx.mode = "off"
            if fixed:
                mark_fixed_passthrough(cache)
            return
        prep = ctx.prepared
        if unreadable and may_drop(self.plan, prep):
            _bad_mask(raw_mask)
        if fixed:  # a static cache: the layers after a stage get as many slots as they keep
            if not may_drop(self.plan, prep):  # nothing dropped: every step runs as the plain model's
                mark_fixed_passthrough(cache)
                ctx.mode = "off"
                return
            problem = fixed_cache_problem(cache)
            if problem is not None:
                from vtoken.errors import UnsupportedCallError

                raise UnsupportedCallError(
                    f"vtoken cannot prune into this {type(cache).__name__}: {problem}; use "
                    "cache_implementation='static' (full attention) or the default dynamic cache"
                )
            ctx.fixed = cache
            ctx.fixed_len = cache.layers[0].max_cache_len if 0 not in getattr(cache, "_vtoken_slots", {}) \
                else cache._vtoken_slots[0]
        ctx.n = q
        ctx.cur_pos = prep.arange.expand(B, q)
        ctx.cur_valid = ctx.orig_valid
        self.prefills_in_flight += 1  # until on_multimodal_done: the probes record
        ctx.in_flight = True
        if cache is None and session is not None and session.state is not None and q > session.state.n_prefill:
            ctx.mode = "replay"
            ctx.replay = session.state
        else:
            ctx.mode = "prefill"
            if session is not None and session.prompt_len is not None and q > session.prompt_len:
                self._check_appended_candidates(prep)
            ctx.state = PruneState(n_prefill=q, stages=[])
            if cache is not None:
                record_pruned_prefill(cache, ctx.state, self.layer_stage, self)
            elif session is not None:
                session.state = ctx.state

    def _dtype(self):
        return next(self.adapter.text_model.parameters()).dtype

    def _check_appended_candidates(self, prep) -> None:
        """A prefill longer than the prompt ``generate`` was given: assisted decoding appended the
        assistant's candidate tokens to it. Visual-token and hidden-state signals are causal, so
        unaffected; a scorer that reads the last token's or the text rows' attention / states
        would rank by a candidate's, and differ from plain greedy decoding: refused where the plan
        drops tokens."""
        readers = [st.scorer.name for st in self.plan
                   if any(not SIGNALS[n].causal for n in getattr(st.scorer, "needs", ()))]
        if readers and may_drop(self.plan, prep):
            from vtoken.errors import UnsupportedCallError

            raise UnsupportedCallError(
                f"assisted decoding (assistant_model / prompt_lookup_num_tokens) runs the prompt's forward with the "
                f"assistant's candidate tokens appended, and {sorted(set(readers))} rank visual tokens by the last or "
                "text tokens, which would include candidates: use a method that does not read the prompt's text "
                "(e.g. divprune, fastervlm) with an assistant, or generate without one"
            )

    @eager
    def on_layer(self, layer: int, args: tuple, kwargs: dict, checkpointed: bool = False):
        """Pre-hook body of decoder layer ``layer``; ``checkpointed``: the layer's forward will be
        recomputed in backward (see :mod:`vtoken.hooks.checkpointing`)."""
        ctx = self.ctx
        if ctx is None or ctx.mode == "off":
            return recall(args, kwargs) if checkpointed else None
        if ctx.mode == "decode":
            kwargs["attention_mask"] = ctx.span_masks[self.layer_stage[layer]]
            return args, kwargs
        hidden_in = args[0] if args else kwargs["hidden_states"]
        ops = None
        if layer in self.stage_layers:
            if ctx.pos_emb0 is None:
                ctx.pos_emb0 = kwargs.get("position_embeddings")
                ctx.pos_ids0 = kwargs.get("position_ids")
            with outside_recompute():
                hidden = run_stage(self, ctx, self.stage_layers.index(layer), hidden_in)
            ops = ctx.stage_ops
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = hidden
        kwargs.update(ctx.span)
        if ctx.fixed is not None and ctx.relaid:  # this layer's static slots: what it keeps + the tokens to come
            size_fixed_layer(ctx.fixed, layer, ctx.fixed_len - (ctx.n - ctx.cur_pos.shape[1]))
        if checkpointed:
            remember(hidden_in, ops, ctx.span)
        return args, kwargs

    def on_fixed_slot_step(self, layer: int, fixed: FixedSlots, args: tuple, kwargs: dict):
        """Pre-hook body of decoder layer ``layer`` in a step after the prefill on a fixed-slot
        cache (``fixed`` its :class:`FixedSlots`): a layer after a stage gets the mask of its own
        slots (:func:`vtoken.hooks.masks.fixed_decode_mask`); every other layer runs as the plain
        model's. Traced, not eager: transformers compiles and CUDA-graphs these steps, and this
        reads only tensors and lists fixed at the prefill."""
        stage = self.layer_stage[layer]
        if stage < 0 or not fixed.prefix:
            return None
        slots = cache_arg(kwargs).layers[layer]
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs["attention_mask"] = M.fixed_decode_mask(fixed.prefix[stage], slots.cumulative_length, hidden.shape[1],
                                                       slots.keys.shape[2], self.attn_impl(), hidden.dtype)
        return args, kwargs

    @eager
    def prune_deepstack(self, visual_pos_masks, visual_embeds):
        """Qwen3-VL's deepstack features for the current layout (:mod:`vtoken.hooks.deepstack`)."""
        return prune_deepstack(self.ctx, visual_pos_masks, visual_embeds)


def open_multimodal_call(rt, kwargs: dict) -> tuple:
    """The start of a multimodal forward (the body of a runtime's pre-hook on the multimodal
    model): a new :class:`CallContext` with the visual features' lengths, whether the call carries
    visual inputs, and (with 2-D ``input_ids``, located in the embeddings where only those are
    given) the inputs the layout is read from. -> (ctx, kwargs as completed, pixels given)."""
    pixels = kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
    if pixels:
        rt.discard_vision_captures()  # this forward runs the vision tower: only its captures count
    ctx = CallContext()
    mm_out = kwargs.get("mm_encoder_outputs") or {}
    for kind in ("image", "video"):
        out = mm_out.get(kind) if isinstance(mm_out, dict) else None
        feats = getattr(out, "pooler_output", None)
        if isinstance(feats, (list, tuple)):
            ctx.feature_lengths[kind] = [int(f.shape[0]) for f in feats]
    input_ids = kwargs.get("input_ids")
    # transformers >= 5.2x encodes the pixels in generate, before the first forward: the forward
    # then gets the features (mm_encoder_outputs) instead of pixel inputs
    encoded = isinstance(mm_out, dict) and any(mm_out.get(kind) is not None for kind in ("image", "video"))
    embeds = kwargs.get("inputs_embeds")
    if (input_ids is None or input_ids.dim() != 2) and (pixels or encoded) and torch.is_tensor(embeds) \
            and embeds.dim() == 3:  # locate the placeholders in the embeddings, as transformers does
        input_ids = rt.adapter.ids_from_embeds(embeds)
        kwargs = {**kwargs, "input_ids": input_ids}
    ctx.visual_call = bool(pixels or encoded)
    session = getattr(rt.tls, "session", None)
    stash = getattr(session, "layout_inputs", None)
    if encoded and stash and input_ids is not None and input_ids.dim() == 2 \
            and session.batch == input_ids.shape[0]:  # rows not expanded (beams): generate's own grids apply
        kwargs = {**kwargs, **{k: v for k, v in stash.items() if kwargs.get(k) is None}}
    if input_ids is not None and input_ids.dim() == 2:
        ctx.inputs = kwargs  # the layout is read in on_text_call, once visual features exist
    return ctx, kwargs, pixels


def _bad_mask(mask):
    from vtoken.errors import PruningConfigError

    raise PruningConfigError(
        f"vtoken cannot read which tokens are padding from this attention_mask ({type(mask).__name__} "
        f"{getattr(mask, 'shape', '')}), and pruning needs it; pass a 2-D mask (batch, seq), a 4-D one "
        "(batch, 1, q, kv) or None"
    )
