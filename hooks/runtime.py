"""The pruning runtime: per-call contexts, stage execution and the per-layer hooks.

Life of a prefill (the forward that sees the images):

1. pre-hook on the multimodal model: read ``input_ids`` and the visual-grid inputs, ask the
   adapter for the :class:`VisualLayout` (segments per sample). No visual tokens -> pass through.
2. pre-hook on the language model: read the 2-D attention mask and the cache; choose a mode:
   ``prefill`` (score and prune), ``replay`` (no-cache generation: re-apply the prompt's
   decisions), ``decode`` (cache carries a pruned prefix) or ``off``.
3. pre-hook on each decoder layer from the first stage on: at a stage layer, gather the signals,
   let the scorer select, and re-lay-out the hidden states (kept tokens in original order, new
   padding on the left); every later layer receives the rotary cos/sin and position ids of the
   kept tokens (their ORIGINAL positions, M-RoPE included) and a mask for the new layout.
4. decode steps: the cache of layers after a stage is shorter; those layers receive a mask built
   from the pruned prefix's validity plus the new tokens. Positions come from ``generate``
   (original, unpruned counting), so nothing else changes. Per step this costs one mask per
   stage and a dict lookup per layer.

State lives on the handle (thread-local per call) and on the KV cache object (the pruned
prefix's layout), never in module globals.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from vtoken.hooks import masks as M
from vtoken.hooks.prefill_plan import PlanCache, candidates, kept_slots, prepare_prefill, text_rows
from vtoken.hooks.probe import attention_rows
from vtoken.signals import SegmentSignals

STATE_ATTR = "_vtoken_state"
PASS_ATTR = "_vtoken_passthrough"  # on a static cache whose prefill dropped nothing: later steps run unpatched

#: signals of the visual tokens themselves: a prefill's trailing tokens do not change them (causal
#: attention), unlike the last token's / the text rows' signals
_CAUSAL_SIGNALS = frozenset({"hidden", "normed_hidden", "keys", "vision_attn", "vision_keys"})

#: the hook bodies run eagerly under ``torch.compile`` (a graph break at each): they read host
#: copies, thread-local state and Python lists that a traced graph must not bake in
_eager = torch.compiler.disable


@dataclass
class StageState:
    """The layout after one stage: original position of every slot (-1 = padding slot)."""

    layer: int
    positions: torch.Tensor  # (B, Ns) long
    valid: torch.Tensor  # (B, Ns) bool
    all_valid: bool = False  # every slot valid (decided once, so decode steps need no sync)
    #: the stage dropped nothing and the layout is still the original one: a no-cache replay
    #: keeps the model's own layout and masks there too (keep-all == the unpatched model, padding
    #: rows' hidden states included)
    identity: bool = False


@dataclass
class PruneState:
    """What decode steps need to know about a pruned prefill; stored on the KV cache."""

    n_prefill: int
    stages: list
    extra: int = 0  # tokens appended after the prefill so far


@dataclass
class StageTrace:
    """Raw record of one stage for stats (converted lazily)."""

    layer: int
    scorer: str
    mode: str
    positions: torch.Tensor  # (B, Ns) original positions after the stage
    seg_sample: torch.Tensor
    seg_index: torch.Tensor  # (S, n) original index within segment of each candidate (-1 pad)
    seg_keep: torch.Tensor  # (S, n) bool
    seg_scores: Optional[torch.Tensor]  # (S, n)
    diagnostics: dict


class PrefillMeta(NamedTuple):
    """What stats need of the last pruned prefill (read after the forward, on request)."""

    layout: object
    prepared: object  # PreparedPrefill: vis_ordinal is uploaded when first read
    orig_valid: Optional[torch.Tensor]


@dataclass
class CallContext:
    layout: object = None
    inputs: Optional[dict] = None
    vision: list = field(default_factory=list)  # [(attn (P,), keys (P, Dk))] per image, in order
    feature_lengths: dict = field(default_factory=dict)
    mode: str = "off"
    orig_valid: Optional[torch.Tensor] = None
    n: int = 0
    cur_pos: Optional[torch.Tensor] = None
    cur_valid: Optional[torch.Tensor] = None
    pos_emb0: object = None
    pos_ids0: Optional[torch.Tensor] = None
    span: dict = field(default_factory=dict)  # kwargs substituted in layers of the current span
    span_masks: list = field(default_factory=list)  # decode: mask per stage
    attn: dict = field(default_factory=dict)  # layer -> {"last": (B,H,1,N), "text": ..., "keys": ...}
    state: Optional[PruneState] = None
    replay: Optional[PruneState] = None
    trace: list = field(default_factory=list)
    ids_host: Optional[torch.Tensor] = None  # host copies of a prefill's input_ids / 2-D mask
    mask_host: Optional[torch.Tensor] = None
    prepared: object = None  # PreparedPrefill (vtoken.hooks.prefill_plan)
    relaid: bool = False  # a stage has re-laid-out the sequence (slots no longer original positions)
    checks: Optional[list] = None  # budget checks deferred to the end of the multimodal forward


class GenerateSession:
    """One ``generate`` call: holds the prompt's decisions for no-cache generation, and the shape of
    the ``input_ids`` the call was given (``generate`` may repeat every row for beams / return
    sequences, and append an assistant's candidates to the prompt's forward)."""

    def __init__(self, batch: Optional[int] = None, prompt_len: Optional[int] = None):
        self.state: Optional[PruneState] = None
        self.batch = batch
        self.prompt_len = prompt_len  # a longer prefill carries appended candidates (assisted decoding)


def _gather_seq(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather a per-token tensor along its sequence axis with a (B, M) index.

    Rotary cos/sin are float (..., B, N, D) (M-RoPE adds a leading axis of 3); position ids are
    integer (..., B, N). A batch axis of size 1 is broadcast to B.
    """
    B, Mlen = idx.shape
    seq_dim = x.dim() - 2 if x.is_floating_point() else x.dim() - 1
    batch_dim = seq_dim - 1
    if B == 1 and x.shape[batch_dim] == 1:  # one row: a single index_select
        return x.index_select(seq_dim, idx[0])
    shape = list(x.shape)
    shape[batch_dim] = B
    x = x.expand(*shape)
    view = [1] * x.dim()
    view[batch_dim], view[seq_dim] = B, Mlen
    full = list(x.shape)
    full[seq_dim] = Mlen
    return x.gather(seq_dim, idx.view(view).expand(full))


_PLAN_CACHES = weakref.WeakKeyDictionary()  # model -> PlanCache, shared by the handles applied to it


def plan_cache_for(model, size: int) -> PlanCache:
    """The model's host-plan cache, holding at most ``size`` plans. It outlives a handle (a plan
    depends on the inputs and the first stage's budget, which is part of the key, not on the
    method), so re-applying pruning to the same model keeps its plans; it is dropped with the
    model, and never stored on it. ``size <= 0``: a disabled cache of its own (the model's is
    left as it is)."""
    if size <= 0:
        return PlanCache(0)
    cache = _PLAN_CACHES.get(model)
    if cache is None:
        cache = _PLAN_CACHES[model] = PlanCache(size)
    elif cache.size != size:
        cache.resize(size)
    return cache


class Runtime:
    """Executes a plan on one model; one per handle."""

    #: run the first stage from the host plan (no syncs); False: the generic device path (tests)
    host_first_stage: bool = True
    #: host plans kept across calls (see PlanCache); 0 disables
    plan_cache_size: int = 32

    def __init__(self, adapter, plan, backend: str = "auto"):
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
        self.probe_needs = self._probe_needs()
        self.needs_vision = any(
            getattr(st.scorer, "needs", frozenset()) & {"vision_attn", "vision_keys"} for st in plan
        )
        #: a scorer reads vision-encoder attention only if the model provides it (``optional_needs``,
        #: e.g. FlowCut's relay): attach() installs the vision probe where the adapter has one
        self.wants_vision = any(
            getattr(st.scorer, "optional_needs", frozenset()) & {"vision_attn"} for st in plan
        )
        #: set by attach() when the vision-encoder probe is installed (required or optional)
        self.vision_probed = False
        #: False once the handle is removed: a KV cache this runtime pruned cannot be continued
        #: by the plain model (its pruned layers are shorter), see _patch_seq_length
        self.attached = True

    # ---------------------------------------------------------------- contexts
    @property
    def ctx(self) -> Optional[CallContext]:
        return getattr(self.tls, "ctx", None)

    @property
    def session(self) -> Optional[GenerateSession]:
        return getattr(self.tls, "session", None)

    @_eager
    def record_feature_lengths(self, kind: str, lengths: list) -> None:
        """Called by adapters when the model computes visual features inside a forward."""
        ctx = self.ctx
        if ctx is not None:
            ctx.feature_lengths[kind] = lengths

    def attn_impl(self) -> str:
        return self.adapter.text_config._attn_implementation or "eager"

    def _probe_needs(self) -> dict:
        """layer -> set of signals to capture there ("last", "text", "keys")."""
        needs = {}
        for st in self.plan:
            want = getattr(st.scorer, "needs", frozenset())
            row_needs = set()
            if want & {"attn_last", "attn_last_text"}:
                row_needs.add("last")
            if "attn_text" in want:
                row_needs.add("text")
            if want & {"keys", "text_keys"}:
                row_needs.add("keys")
            if row_needs:
                if st.layer == 0:
                    from vtoken.errors import PruningConfigError

                    raise PruningConfigError(
                        f"scorer {st.scorer.name!r} needs attention rows of the layer before its stage; "
                        "it cannot run at layer 0 (before the LLM): use layer >= 1"
                    )
                needs.setdefault(st.layer - 1, set()).update(row_needs)
            if "layer_attn_last" in want:
                for layer in range(st.layer):
                    needs.setdefault(layer, set()).add("last")
            if "layer_attn_full" in want:  # attention rollout truly needs every row (N x N per layer)
                for layer in range(st.layer):
                    needs.setdefault(layer, set()).add("full")
        return needs

    # ---------------------------------------------------------------- hook bodies
    def discard_vision_captures(self) -> None:
        """Forget vision-encoder signals captured so far on this thread. Called where a new set of
        images starts (a forward that runs the vision tower, a ``generate`` call), so signals of an
        encoder run outside a pruned call (``model.model.get_image_features(...)`` for embeddings)
        never reach the next call's scorers."""
        self.tls.vision = []

    @_eager
    def on_multimodal_call(self, kwargs: dict) -> None:
        pixels = kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
        if pixels:
            self.discard_vision_captures()  # this forward runs the vision tower: only its captures count
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
        if input_ids is not None and input_ids.dim() == 2:
            ctx.inputs = kwargs  # the layout is read in on_text_call, once visual features exist
            if pixels:
                self._read_host_inputs(ctx, kwargs)
        elif pixels or encoded:
            from vtoken.errors import UnsupportedCallError

            raise UnsupportedCallError(
                "vtoken locates the visual tokens by their placeholder ids in input_ids, but this call has "
                "inputs_embeds and pixel inputs without input_ids; pass input_ids (with the pixel inputs) instead "
                "of inputs_embeds, or call handle.remove() to run it unpruned"
            )
        self.tls.ctx = ctx

    def _read_host_inputs(self, ctx: CallContext, kwargs: dict) -> None:
        """A prefill with images: copy ``input_ids`` and the 2-D mask to the host now (before the
        vision tower runs, so the copy waits for nothing) and, when the adapter can lay out the
        visual tokens from the inputs alone, prepare the first stage on the host
        (:mod:`vtoken.hooks.prefill_plan`)."""
        input_ids = kwargs["input_ids"]
        ctx.checks = []
        ctx.ids_host = input_ids.cpu()
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape == input_ids.shape:
            ctx.mask_host = mask.cpu().bool()
        if self.adapter.layout_needs_features:
            return
        key = self._plan_key(ctx.ids_host, ctx.mask_host, kwargs, input_ids.device)
        ctx.prepared = self.plans.get(key) if key is not None else None
        if ctx.prepared is not None:
            return
        layout = self.adapter.layout(ctx.ids_host, kwargs, ctx)
        if layout is not None:
            valid = ctx.mask_host if ctx.mask_host is not None else torch.ones(input_ids.shape, dtype=torch.bool)
            ctx.prepared = prepare_prefill(layout, valid, self.plan[0].keep, input_ids.device)
            if key is not None:
                self.plans.put(key, ctx.prepared)

    def _plan_key(self, ids_host, mask_host, inputs: dict, device):
        """The PlanCache key of a prefill, or None when its plan is not cached (cache off, or an
        adapter whose layout needs the forward's features or does not declare its inputs)."""
        names = self.adapter.layout_inputs
        if names is None or self.plans.size <= 0 or self.adapter.layout_needs_features:
            return None
        device = torch.device(device)
        # a plan is uploaded without blocking on the stream of the call that made it: another
        # stream gets its own plan rather than one whose copy may not have landed for it
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
        return PlanCache.key(ids_host, mask_host, {n: inputs.get(n) for n in names}, self.plan[0].keep,
                             (str(device), stream))

    @_eager
    def on_multimodal_done(self) -> None:
        ctx = self.ctx
        self.tls.ctx = None
        if ctx is None:
            return
        for name, got, budget in ctx.checks or ():
            _check_budget(name, got, budget)
        if ctx.mode == "prefill" and ctx.trace:
            self.last_trace = ctx.trace
            self.last_meta = PrefillMeta(ctx.layout, ctx.prepared, ctx.orig_valid)
            self.tls.last = (ctx.trace, self.last_meta)
            self.tls.prefills = getattr(self.tls, "prefills", 0) + 1

    @_eager
    def on_text_call(self, kwargs: dict) -> None:
        ctx = self.ctx
        if ctx is None:  # language model called directly: nothing to do
            ctx = self.tls.ctx = CallContext()
        embeds = kwargs.get("inputs_embeds")
        mask2d = kwargs.get("attention_mask")
        bad_mask = mask2d is not None and (not torch.is_tensor(mask2d) or mask2d.dim() != 2)
        if bad_mask:
            mask2d = None
        cache = _cache_arg(kwargs)
        state = getattr(cache, STATE_ATTR, None) if cache is not None else None
        q = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        B = embeds.shape[0] if embeds is not None else kwargs["input_ids"].shape[0]
        if getattr(cache, PASS_ATTR, False):  # a later step on a static cache of a keep-all prefill
            ctx.inputs, ctx.mode = None, "off"
            return
        # a pruned prefix (state) is never on a fixed-slot cache (refused or passed through at its
        # prefill), so decode steps skip the per-layer scan
        fixed = state is None and _fixed_slot_cache(cache)
        if bad_mask and not fixed and (state is not None or ctx.inputs is not None):
            _bad_mask(kwargs.get("attention_mask"))
        if state is not None:
            ctx.mode = "decode"
            state.extra += q
            impl, dtype = self.attn_impl(), self._dtype()
            if mask2d is not None:
                new_valid = mask2d[:, -state.extra :].bool()
            else:
                new_valid = torch.ones(B, state.extra, dtype=torch.bool, device=embeds.device)
            ctx.span_masks = [M.extend_mask(s.valid, new_valid, q, impl, dtype, s.all_valid) for s in state.stages]
            return
        if ctx.prepared is not None and tuple(ctx.prepared.layout.segment_of.shape) != (B, q):
            ctx.prepared = None  # the language model got another sequence than input_ids: lay out again
        plan_key = None
        if ctx.inputs is not None:  # a prefill: locate the visual tokens now that features exist
            if ctx.prepared is None:
                ids = ctx.ids_host if ctx.ids_host is not None else ctx.inputs["input_ids"].cpu()
                if mask2d is not None and (ctx.mask_host is None or tuple(ctx.mask_host.shape) != (B, q)):
                    ctx.mask_host = mask2d.cpu().bool()
                plan_key = self._plan_key(ids, None if mask2d is None else ctx.mask_host, ctx.inputs, embeds.device)
                ctx.prepared = self.plans.get(plan_key) if plan_key is not None else None
                if ctx.prepared is not None and tuple(ctx.prepared.layout.segment_of.shape) != (B, q):
                    ctx.prepared = plan_key = None  # the plan of input_ids, for another sequence: not this one
                if ctx.prepared is None:
                    ctx.layout = self.adapter.layout(ids, ctx.inputs, ctx)
            ctx.inputs = None
            ctx.vision = getattr(self.tls, "vision", None) or []
            self.tls.vision = []
        if ctx.layout is None and ctx.prepared is None:
            ctx.mode = "off"
            return
        N = q
        ctx.n = N
        dev = embeds.device
        ctx.orig_valid = mask2d.bool() if mask2d is not None else torch.ones(B, N, dtype=torch.bool, device=dev)
        if ctx.prepared is None:
            structural = self.adapter.structural_from_embeds(embeds, ctx.layout)
            if structural is not None:
                _refine_structural(ctx.layout, structural)
            if mask2d is None:
                valid = torch.ones(B, N, dtype=torch.bool)
            elif ctx.mask_host is not None and tuple(ctx.mask_host.shape) == (B, N):
                valid = ctx.mask_host
            else:
                valid = ctx.orig_valid.cpu()
            ctx.prepared = prepare_prefill(ctx.layout, valid, self.plan[0].keep, dev)
            if plan_key is not None:
                self.plans.put(plan_key, ctx.prepared)
        prep = ctx.prepared
        if fixed:  # a static cache: no pruned layout fits its slots; a plan that drops nothing runs unpatched
            if self._may_drop(prep):
                from vtoken.errors import UnsupportedCallError

                raise UnsupportedCallError(
                    f"{type(cache).__name__} (cache_implementation='static') keeps a fixed slot per position in "
                    "every layer, which cannot hold the shorter cache of pruned layers; use the default dynamic "
                    "cache (leave cache_implementation unset), or vtoken.engine.StaticDecoder(model).generate(...) "
                    "for static KV buffers and CUDA graphs with pruning"
                )
            setattr(cache, PASS_ATTR, True)
            ctx.mode = "off"
            return
        ctx.layout = prep.layout
        ctx.cur_pos = prep.arange.expand(B, N)
        ctx.cur_valid = ctx.orig_valid
        session = self.session
        if cache is None and session is not None and session.state is not None and N > session.state.n_prefill:
            ctx.mode = "replay"
            ctx.replay = session.state
        else:
            ctx.mode = "prefill"
            if session is not None and session.prompt_len is not None and N > session.prompt_len:
                self._check_appended_candidates(prep)
            ctx.state = PruneState(n_prefill=N, stages=[])
            if cache is not None:
                setattr(cache, STATE_ATTR, ctx.state)
                _patch_seq_length(cache, ctx.state, self.layer_stage, self)
                _patch_crop(cache, ctx.state)
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
        readers = [st.scorer.name for st in self.plan if set(getattr(st.scorer, "needs", ())) - _CAUSAL_SIGNALS]
        if readers and self._may_drop(prep):
            from vtoken.errors import UnsupportedCallError

            raise UnsupportedCallError(
                f"assisted decoding (assistant_model / prompt_lookup_num_tokens) runs the prompt's forward with the "
                f"assistant's candidate tokens appended, and {sorted(set(readers))} rank visual tokens by the last or "
                "text tokens, which would include candidates: use a method that does not read the prompt's text "
                "(e.g. divprune, fastervlm) with an assistant, or generate without one"
            )

    def _may_drop(self, prep) -> bool:
        """Whether the plan may drop a visual token of this prefill (host arithmetic, no sync): some
        stage's budget is below a segment's count, or a stage chooses its own count (adaptive)."""
        from vtoken.plan import tokens_for

        counts = prep.seg_count_host
        return any(getattr(st.scorer, "adaptive", False) or any(tokens_for(st.keep, c) < c for c in counts)
                   for st in self.plan)

    @_eager
    def on_layer(self, layer: int, args: tuple, kwargs: dict):
        ctx = self.ctx
        if ctx is None or ctx.mode == "off":
            return None
        if ctx.mode == "decode":
            kwargs["attention_mask"] = ctx.span_masks[self.layer_stage[layer]]
            return args, kwargs
        if layer in self.stage_layers:
            hidden = args[0] if args else kwargs["hidden_states"]
            if ctx.pos_emb0 is None:
                ctx.pos_emb0 = kwargs.get("position_embeddings")
                ctx.pos_ids0 = kwargs.get("position_ids")
            hidden = self._run_stage(ctx, self.stage_layers.index(layer), hidden)
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = hidden
        kwargs.update(ctx.span)
        return args, kwargs

    # ---------------------------------------------------------------- probes
    def probe(self, layer: int):
        """The attention function of a probed layer (see :mod:`vtoken.hooks.probe`).

        During a pruning prefill it returns the layer's attention output AND records the softmax
        rows the next stage needs: with the Triton backend (CUDA) both come from one fused
        ``attend_and_score`` call; otherwise the model's own attention runs and the rows are
        computed from the same queries and keys (O(rows x N)).
        """
        needs = self.probe_needs.get(layer, set())
        want_rows = bool(needs & {"last", "text", "full"})

        def run(base, module, query, key, value, attention_mask, **kw):
            ctx = self.ctx
            if ctx is None or ctx.mode != "prefill" or query.shape[2] != ctx.cur_pos.shape[1]:
                return base(module, query, key, value, attention_mask, **kw)
            rec = ctx.attn.setdefault(layer, {})
            valid = ctx.cur_valid
            parts = []
            if "last" in needs:  # the last valid slot of each row (from the host plan on the original layout)
                last = ctx.prepared.last_valid if ctx.prepared is not None and not ctx.relaid else None
                parts.append(("last", _last_valid(valid).unsqueeze(1) if last is None else last))
            if "text" in needs:
                parts.append(("text", _text_rows(ctx)[0]))
            if "full" in needs:
                parts.append(("full", torch.arange(valid.shape[1], device=valid.device).expand(valid.shape[0], -1)))
            rows = (parts[0][1] if len(parts) == 1 else torch.cat([r for _, r in parts], dim=1)) if parts else None
            use_kernel = want_rows and key.shape[2] == query.shape[2] and self._kernel_backend(query) == "triton"
            if use_kernel:
                from vtoken.kernels import attend_and_score

                out, probs = attend_and_score(query, key, value, score_rows=rows, key_padding_mask=valid,
                                              scale=module.scaling, average_heads=False, backend="triton")
                out = out.transpose(1, 2).contiguous()
                result = (out, None)
            else:
                result = base(module, query, key, value, attention_mask, **kw)
                probs = attention_rows(query, key, rows, valid, module.scaling) if rows is not None else None
            start = 0
            for name, r in parts:
                rec[name] = probs[:, :, start: start + r.shape[1]]
                start += r.shape[1]
            if "full" in rec:
                rec["full"] = rec["full"].mean(dim=1)  # (B, N, N) head-averaged
            if "keys" in needs:
                rec["keys"] = key
            return result

        return _eager(run)

    def vision_probe(self):
        """Attention function of the probed vision-encoder layer: records, per image, the
        encoder attention each LLM visual token receives and its keys (see the adapters)."""

        def run(base, module, query, key, value, attention_mask, **kw):
            out = base(module, query, key, value, attention_mask, **kw)
            scaling = getattr(module, "scaling", None) or getattr(module, "scale", None) or query.shape[-1] ** -0.5
            pending = getattr(self.tls, "vision", None)
            if pending is None:
                pending = self.tls.vision = []
            pending.extend(self.adapter.vision_signals(query, key, scaling))
            return out

        return _eager(run)

    def _kernel_backend(self, tensor) -> str:
        if self.backend == "torch":
            return "torch"
        from vtoken.kernels import resolve_backend

        return resolve_backend(self.backend, tensor)  # "triton" on CUDA (or when forced), else "torch"

    # ---------------------------------------------------------------- stages
    def _run_stage(self, ctx: CallContext, i: int, hidden: torch.Tensor) -> torch.Tensor:
        stage = self.plan[i]
        if ctx.mode == "replay":
            saved = ctx.replay.stages[i]
            if saved.identity and not ctx.relaid:  # the prompt's stage dropped nothing: nor does its replay
                return hidden
            B = hidden.shape[0]
            extra = torch.arange(ctx.replay.n_prefill, ctx.n, device=hidden.device).expand(B, -1)
            new_pos = torch.cat([saved.positions, extra], dim=1)
            return self._relayout(ctx, hidden, new_pos, stage.layer, record=False)
        lay = ctx.layout
        cur_pos, cur_valid = ctx.cur_pos, ctx.cur_valid
        prep = ctx.prepared
        # the first stage on the original layout: candidates prepared on the host (no syncs)
        first = self.host_first_stage and prep is not None and i == 0 and ctx.mode == "prefill"
        c = prep.first if first else candidates(lay, cur_pos, cur_valid, prep.index_in_seg, stage.keep)
        slot_pad, smask, index, budget, cand = c.slot_pad, c.smask, c.index, c.budget, c.cand
        sample = lay.seg_sample
        safe_slot = slot_pad.clamp(min=0)
        sig = SegmentSignals(
            mask=smask,
            budget=budget,
            index=index,
            sample=sample,
            ordinal=lay.seg_ordinal,
            original=lay.seg_count,
            grid=lay.seg_grid,
            generator=None,
        )
        self._fill_signals(ctx, stage, sig, hidden, slot_pad, safe_slot)
        sel = stage.scorer.select(sig)
        # a topk_selection over this stage's own mask and budget meets the budget by construction
        trusted = sel.exact_for is not None and sel.exact_for[0] is smask and sel.exact_for[1] is budget
        keep = sel.keep if trusted else sel.keep & smask
        exact = not getattr(stage.scorer, "adaptive", False)
        name = getattr(stage.scorer, "name", type(stage.scorer).__name__)
        if exact and not trusted:
            if ctx.checks is not None:  # checked when the forward ends (a check here would sync)
                ctx.checks.append((name, keep.sum(1), budget))
            else:
                _check_budget(name, keep.sum(1), budget)
        known = first and exact  # what the stage keeps per row is known on the host
        if stage.mode == "merge":
            hidden = _merge(hidden, sig, keep, sel.merge_into, slot_pad)
        trace = StageTrace(
            layer=stage.layer,
            scorer=name,
            mode=stage.mode,
            positions=cur_pos,
            seg_sample=sample,
            seg_index=index,
            seg_keep=keep,
            seg_scores=sel.scores,
            diagnostics=dict(sig.diagnostics),
        )
        ctx.trace.append(trace)
        nothing_dropped = (not prep.drop_any) if known else not bool((smask & ~keep).any())
        if nothing_dropped and stage.mode == "select":
            # nothing dropped anywhere: keep the layout (and the model's own masks) as they are
            if ctx.state is not None:
                all_valid = prep.all_valid if known else bool(cur_valid.all())
                ctx.state.stages.append(StageState(layer=stage.layer, positions=cur_pos, valid=cur_valid,
                                                   all_valid=all_valid, identity=not ctx.relaid))
            return hidden
        if known:  # kept slots and per-row counts from the host plan: no syncs, few launches
            keep_slot = kept_slots(prep.keep_base, prep.cand_flat, keep, cur_pos.shape)
            Nn, rank = max(prep.kept_host), keep_slot.cumsum(1) + prep.rank_shift
        else:
            B, Nc = cur_pos.shape
            base = torch.cat([((cur_pos >= 0) & cur_valid & ~cand).view(-1), cand.new_zeros(1)])
            flat = torch.where(smask, sample.unsqueeze(1) * Nc + slot_pad, torch.full_like(slot_pad, B * Nc))
            keep_slot = kept_slots(base, flat, keep, (B, Nc))
            n_b = keep_slot.sum(1)
            Nn = int(n_b.max())
            rank = keep_slot.cumsum(1) - 1 + (Nn - n_b).unsqueeze(1)
        # scatter each kept slot to its rank (new padding on the left); the rest to a spare column
        # (the clamp only matters when a scorer broke its budget, which the deferred check reports)
        target = torch.where(keep_slot, rank, Nn).clamp_(0, Nn)
        new_pos = torch.full((cur_pos.shape[0], Nn + 1), -1, dtype=torch.long, device=hidden.device)
        new_pos = new_pos.scatter_(1, target, cur_pos)[:, :Nn]
        trace.positions = new_pos
        all_valid = (prep.all_valid and len(set(prep.kept_host)) == 1) if known else None
        return self._relayout(ctx, hidden, new_pos, stage.layer, record=True, all_valid=all_valid)

    def _relayout(self, ctx, hidden, new_pos, layer, record, all_valid=None):
        """Move to the layout ``new_pos`` (B, Nn) of original positions (-1 = padding slot);
        ``all_valid``: whether every new slot is valid, when the caller knows it (else one sync)."""
        B, Nc = ctx.cur_pos.shape
        safe = new_pos.clamp(min=0)
        if not ctx.relaid:  # still the original layout: slot == original position
            take = safe
        else:  # inv[b, p] = current slot of original position p (positions not present: a spare column)
            where = torch.where(ctx.cur_pos >= 0, ctx.cur_pos, torch.full_like(ctx.cur_pos, ctx.n))
            inv = torch.zeros(B, ctx.n + 1, dtype=torch.long, device=hidden.device)
            inv = inv.scatter_(1, where, torch.arange(Nc, device=hidden.device).expand(B, Nc))[:, : ctx.n]
            take = inv.gather(1, safe)
        ctx.relaid = True  # the original layout's text rows (prepared.text) no longer apply
        hidden = hidden.gather(1, take.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if all_valid:
            valid = torch.ones(new_pos.shape, dtype=torch.bool, device=new_pos.device)
        else:
            valid = ctx.orig_valid.gather(1, safe) & (new_pos >= 0)
        ctx.cur_pos, ctx.cur_valid = new_pos, valid
        span = {}
        if ctx.pos_emb0 is not None:
            span["position_embeddings"] = tuple(_gather_seq(t, safe) for t in ctx.pos_emb0)
        if ctx.pos_ids0 is not None:
            span["position_ids"] = _gather_seq(ctx.pos_ids0, safe)
        all_valid = bool(valid.all()) if all_valid is None else all_valid
        span["attention_mask"] = M.prefill_mask(valid, self.attn_impl(), hidden.dtype, all_valid)
        ctx.span = span
        if record and ctx.state is not None:
            ctx.state.stages.append(StageState(layer=layer, positions=new_pos, valid=valid, all_valid=all_valid))
        return hidden

    def _fill_signals(self, ctx, stage, sig, hidden, slot_pad, safe_slot):
        needs = getattr(stage.scorer, "needs", frozenset())
        sample = sig.sample
        rows_b = sample.unsqueeze(1)
        if "hidden" in needs:
            sig.hidden = hidden[rows_b, safe_slot]
        if needs & {"text_hidden", "attn_text", "attn_last_text", "text_keys", "text_after", "normed_text_hidden"}:
            text_rows, text_mask = _text_rows(ctx)
            sig.text_mask = text_mask[sample]
            tsafe = text_rows.clamp(min=0)[sample]
            if "text_hidden" in needs:
                sig.text_hidden = hidden[rows_b, tsafe]
            if "text_after" in needs:  # text rows whose original position follows the segment's last token
                text_pos = ctx.cur_pos[sample].gather(1, tsafe)
                sig.text_after = sig.text_mask & (text_pos > _segment_end(ctx.layout).unsqueeze(1))
        if needs & {"normed_hidden", "normed_text_hidden"}:
            norm = self.adapter.final_norm
            if norm is None:
                from vtoken.errors import PruningConfigError

                raise PruningConfigError(f"scorer {stage.scorer.name!r} needs the language model's final norm, "
                                         f"which this model's adapter cannot provide")
            if "normed_hidden" in needs:
                sig.normed_hidden = norm(sig.hidden if sig.hidden is not None else hidden[rows_b, safe_slot])
            if "normed_text_hidden" in needs:
                sig.normed_text_hidden = norm(sig.text_hidden if sig.text_hidden is not None else hidden[rows_b, tsafe])
        rec = ctx.attn.get(stage.layer - 1, {})
        if "attn_last" in needs:
            sig.attn_last = _per_segment(rec["last"][:, :, 0, :], sample, safe_slot)
        if "attn_last_text" in needs:
            sig.attn_last_text = _per_segment(rec["last"][:, :, 0, :], sample, tsafe)
        if "attn_text" in needs:
            text = rec["text"]  # (B, H, T, Nc)
            per = text[sample]  # (S, H, T, Nc)
            sig.attn_text = per.gather(3, safe_slot.view(-1, 1, 1, safe_slot.shape[1]).expand(-1, per.shape[1], per.shape[2], -1))
        if needs & {"keys", "text_keys"}:
            key = rec["keys"]  # (B, Hkv, Nc, D)
            if ctx.pos_emb0 is not None:  # the rotary phase of each sample alone (left padding: see the adapter)
                key = self.adapter.keys_at_sample_positions(key, ctx.pos_emb0, ctx.orig_valid.int().argmax(dim=1))
            flat = key.permute(0, 2, 1, 3).reshape(key.shape[0], key.shape[2], -1)
            if "keys" in needs:
                sig.keys = flat[rows_b, safe_slot]
            if "text_keys" in needs:
                sig.text_keys = flat[rows_b, tsafe]
        if needs & {"vision_attn", "vision_keys"}:
            self._fill_vision(ctx, stage, sig)
        elif self.vision_probed and getattr(stage.scorer, "optional_needs", frozenset()) & {"vision_attn"}:
            self._fill_optional_vision(ctx, sig)
        if "layer_attn_full" in needs:
            full = torch.stack([ctx.attn[layer]["full"] for layer in range(stage.layer)], dim=1)  # (B, Lyr, N, N)
            sig.layer_attn_full = full[sample]
            sig.full_pos = torch.where(sig.mask, slot_pad, torch.full_like(slot_pad, -1))
            sig.full_query = _last_valid(ctx.cur_valid)[sample]
        if "layer_attn_last" in needs:
            per_layer = [ctx.attn[layer]["last"][:, :, 0, :] for layer in range(stage.layer)]
            sig.layer_attn_last = torch.stack([_per_segment(t, sample, safe_slot) for t in per_layer], dim=1)
        missing = needs - {"hidden", "text_hidden", "text_after", "normed_hidden", "normed_text_hidden", "attn_last",
                           "attn_last_text", "attn_text", "keys", "text_keys", "layer_attn_last", "vision_attn",
                           "vision_keys", "layer_attn_full", "full_pos", "full_query"}
        if missing:
            extra = getattr(ctx, "extra_signals", {}) or {}
            for name in missing:
                if name in extra:
                    setattr(sig, name, extra[name](ctx, sig))
                else:
                    from vtoken.errors import PruningConfigError

                    raise PruningConfigError(
                        f"scorer {stage.scorer.name!r} needs signal {name!r}, which this model/stage cannot provide"
                    )

    def _fill_optional_vision(self, ctx, sig):
        """``vision_attn`` for a scorer that reads it only where available: the image segments'
        encoder attention (the captures, in order, belong to the images: the towers run images
        first), NaN rows for the other segments (video); left None when the captures do not
        match the images' tokens."""
        lay = ctx.layout
        counts = ctx.prepared.seg_count_host if ctx.prepared is not None else lay.seg_count.tolist()
        _repeat_for_expanded_rows(ctx, self.session, counts)
        S, n = sig.mask.shape
        images = [s for s, kind in enumerate(lay.seg_kind) if kind == "image"]
        caps = ctx.vision[:len(images)]
        if not S or not images or len(counts) != S or len(caps) != len(images) or any(
                v[0].numel() != counts[s] for v, s in zip(caps, images)):
            return
        rows = [None] * S
        for v, s in zip(caps, images):
            rows[s] = torch.nn.functional.pad(v[0].float(), (0, n - v[0].numel()))
        nan = torch.full((n,), float("nan"), device=caps[0][0].device)
        attn = torch.stack([nan if r is None else r for r in rows])
        sig.vision_attn = attn.gather(1, sig.index.clamp(min=0).to(attn.device)).to(sig.mask.device)

    def _fill_vision(self, ctx, stage, sig):
        """``vision_attn`` / ``vision_keys`` of image segments from the encoder captures. A video
        segment is not mapped to encoder patches: it may only come with a budget that keeps it
        whole (nothing to rank: NaN scores, zero keys), else the call is refused."""
        from vtoken.errors import PruningConfigError
        from vtoken.plan import tokens_for

        lay = ctx.layout
        counts = ctx.prepared.seg_count_host if ctx.prepared is not None else lay.seg_count.tolist()
        images = [s for s, kind in enumerate(lay.seg_kind) if kind == "image"]
        if any(kind != "image" and tokens_for(stage.keep, c) < c for kind, c in zip(lay.seg_kind, counts)):
            raise PruningConfigError(
                f"scorer {stage.scorer.name!r} reads vision-encoder attention, which vtoken maps to LLM tokens for "
                "images only (not video) so far; for inputs with video use an LLM-side method (e.g. fastv or "
                "divprune), or a budget that keeps every video token (keep=1.0)")
        _repeat_for_expanded_rows(ctx, self.session, counts)
        caps = ctx.vision[:len(images)] if len(images) < len(counts) else ctx.vision  # video captures follow
        if len(caps) != len(images) or any(v[0].numel() != counts[s] for v, s in zip(caps, images)):
            raise PruningConfigError(
                f"scorer {stage.scorer.name!r} needs vision-encoder signals, but the captured encoder attention "
                f"({[v[0].numel() for v in caps]}) does not match the images' tokens ({[counts[s] for s in images]})"
            )
        S, n = sig.mask.shape
        if not S:
            sig.vision_attn = None
            return
        idx = sig.index.clamp(min=0)
        dev = caps[0][0].device if caps else sig.mask.device
        attn = torch.full((S, n), float("nan"), device=dev)
        for v, s in zip(caps, images):
            attn[s, : v[0].numel()] = v[0].float()
        sig.vision_attn = attn.gather(1, idx.to(dev)).to(sig.mask.device)
        if "vision_keys" in getattr(stage.scorer, "needs", ()):
            if not caps:
                raise PruningConfigError(f"scorer {stage.scorer.name!r} needs vision-encoder keys of an image")
            keys = torch.zeros(S, n, caps[0][1].shape[-1], dtype=caps[0][1].dtype, device=caps[0][1].device)
            for v, s in zip(caps, images):
                keys[s, : v[1].shape[0]] = v[1]
            sig.vision_keys = keys.gather(1, idx.to(keys.device).unsqueeze(-1).expand(-1, -1, keys.shape[-1])).to(
                sig.mask.device)

    # ---------------------------------------------------------------- qwen3-vl deepstack
    @_eager
    def prune_deepstack(self, visual_pos_masks, visual_embeds):
        ctx = self.ctx
        pos = ctx.cur_pos
        B = pos.shape[0]
        kept = torch.zeros(B, ctx.n, dtype=torch.bool, device=pos.device)
        bb, jj = (pos >= 0).nonzero(as_tuple=True)
        kept[bb, pos[bb, jj]] = True
        vpm = visual_pos_masks.to(pos.device)
        rows = kept[vpm]
        new_mask = vpm.gather(1, pos.clamp(min=0)) & (pos >= 0)
        return new_mask, visual_embeds[rows.to(visual_embeds.device)]


def _cache_arg(kwargs: dict):
    """The KV cache a language-model call received: ``past_key_values`` (transformers <= 5.23) or
    ``cache`` (the name from 5.24 on)."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache


def _repeat_for_expanded_rows(ctx, session, counts) -> None:
    """Match the vision-encoder captures to a batch that ``generate`` expanded after encoding.

    transformers >= 5.2x encodes each image once, then repeats its features for beam search /
    ``num_return_sequences``: every row of the ``session.batch`` rows the call was given comes
    ``k`` times in a row (``repeat_interleave``), while the captures (images first, in order) are
    those of the original rows. Repeat each original row's image captures ``k`` times (the
    callers check the token counts); nothing changes outside such a call or when the captures
    already cover every image (older transformers encode the expanded pixels).
    """
    lay, caps = ctx.layout, ctx.vision
    B = int(lay.segment_of.shape[0])
    b0 = getattr(session, "batch", None)
    if not caps or not b0 or B <= b0 or B % b0:
        return
    img_counts = [c for c, kind in zip(counts, lay.seg_kind) if kind == "image"]
    if len(caps) >= len(img_counts) and all(v[0].numel() == c for v, c in zip(caps, img_counts)):
        return  # the captures already cover the expanded rows
    k = B // b0
    per_row = [0] * B
    for b, kind in zip(lay.seg_sample.tolist(), lay.seg_kind):
        per_row[b] += kind == "image"
    out, off = [], 0
    for g in range(0, B, k):
        n = per_row[g]
        if any(per_row[g + j] != n for j in range(k)):
            return
        out += caps[off:off + n] * k
        off += n
    if off <= len(caps):
        ctx.vision = out


def _fixed_slot_cache(cache) -> bool:
    """A KV cache whose layers keep a fixed slot per position (transformers' StaticCache and its
    sliding-window / hybrid kin: ``is_compileable`` layers), which a pruned layer cannot fill."""
    if cache is None:
        return False
    layers = getattr(cache, "layers", None)
    if layers:
        return any(getattr(layer, "is_compileable", False) for layer in layers)
    return bool(getattr(cache, "is_compileable", False))


def _bad_mask(mask):
    from vtoken.errors import PruningConfigError

    raise PruningConfigError(
        f"vtoken needs a 2-D attention_mask (batch, seq) or None; got {type(mask).__name__} "
        f"{getattr(mask, 'shape', '')}"
    )


def _check_budget(name: str, got: torch.Tensor, budget: torch.Tensor) -> None:
    """A non-adaptive scorer must keep exactly its budget per segment."""
    if not torch.equal(got, budget):
        raise RuntimeError(f"scorer {name!r} kept {got.tolist()} tokens, budget was {budget.tolist()}")


def _refine_structural(layout, structural: torch.Tensor) -> None:
    layout.structural = structural.to(layout.segment_of.device) & layout.visual
    S = layout.num_segments
    seg = layout.segment_of[layout.prunable]
    layout.seg_count = torch.bincount(seg, minlength=S)
    layout.seg_grid = [g if g is not None and g[0] * g[1] * g[2] == int(c) else None
                       for g, c in zip(layout.seg_grid, layout.seg_count.tolist())]


def _per_segment(rows: torch.Tensor, sample: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, H, Nc) per-row values -> (S, H, n) values of each segment's candidate slots
    ``slots`` (S, n) in row ``sample`` (S,): two gathers (cheaper on the host than advanced
    indexing)."""
    per = rows.index_select(0, sample)
    return per.gather(2, slots.unsqueeze(1).expand(-1, per.shape[1], -1))


def _last_valid(valid: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last valid slot."""
    N = valid.shape[1]
    idx = torch.arange(N, device=valid.device).expand_as(valid)
    return torch.where(valid, idx, torch.full_like(idx, -1)).max(dim=1).values.clamp(min=0)


def _segment_end(layout) -> torch.Tensor:
    """(S,) original position of each segment's last visual token (structural ones included)."""
    seg = layout.segment_of
    S = layout.num_segments
    pos = torch.arange(seg.shape[1], device=seg.device).expand_as(seg).reshape(-1)
    idx = torch.where(seg >= 0, seg, torch.full_like(seg, S)).reshape(-1)  # text/padding -> a spare slot
    end = torch.full((S + 1,), -1, dtype=torch.long, device=seg.device)
    return end.scatter_reduce_(0, idx, pos, reduce="amax")[:S]


def _text_rows(ctx):
    """(B, T) slot indices of valid non-visual tokens (-1 padded), and (B, T) mask."""
    if not ctx.relaid and ctx.prepared is not None:
        return ctx.prepared.text
    return text_rows(ctx.layout, ctx.cur_pos, ctx.cur_valid)


def _merge(hidden, sig, keep, merge_into, slot_pad):
    """Average every dropped candidate into a kept candidate of its segment (by ``merge_into`` or
    by cosine similarity of hidden states); returns the updated hidden states."""
    S, n = keep.shape
    rows_b = sig.sample.unsqueeze(1)
    safe_slot = slot_pad.clamp(min=0)
    h = hidden[rows_b, safe_slot].float()  # (S, n, D)
    dropped = sig.mask & ~keep
    if merge_into is None:
        hn = torch.nn.functional.normalize(h, dim=-1)
        sim = hn @ hn.transpose(1, 2)
        sim = sim.masked_fill(~keep.unsqueeze(1), float("-inf"))
        merge_into = sim.argmax(dim=-1)
    target = torch.where(dropped & (merge_into >= 0), merge_into, torch.arange(n, device=keep.device).expand(S, n))
    target = torch.where(sig.mask, target, torch.arange(n, device=keep.device).expand(S, n))
    summed = torch.zeros_like(h).scatter_add_(1, target.unsqueeze(-1).expand_as(h), h * sig.mask.unsqueeze(-1))
    count = torch.zeros(S, n, dtype=torch.float32, device=h.device).scatter_add_(1, target, sig.mask.float())
    merged = summed / count.clamp(min=1).unsqueeze(-1)
    upd = keep & (count > 1)
    out = hidden.clone()
    sb = rows_b.expand(S, n)[upd]
    out[sb, slot_pad[upd]] = merged[upd].to(hidden.dtype)
    return out


def _patch_seq_length(cache, state: PruneState, layer_stage: list, runtime=None) -> None:
    """Make ``cache.get_seq_length(layer)`` report the ORIGINAL (unpruned) length, which is what
    transformers uses it for (positions, slicing new tokens on continuation). Once ``runtime``'s
    handle is removed, a cache whose prefix it pruned refuses instead (transformers asks for the
    length before it continues from a cache): the plain model would attend to its shorter layers
    with masks for the full length."""
    if "get_seq_length" in cache.__dict__:
        return
    import weakref

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
        physical = bound(cache_ref(), layer_idx)
        i = layer_stage[layer_idx] if layer_idx < len(layer_stage) else -1
        if i < 0 or i >= len(state.stages) or physical == 0:
            return physical
        return physical + state.n_prefill - state.stages[i].positions.shape[1]

    cache.get_seq_length = get_seq_length


def _patch_crop(cache, state: PruneState) -> None:
    """Keep the pruned prefix's record (``state``: the tokens appended after the prefill, which size
    the decode masks, and each stage's layout) in step when transformers crops the cache: assisted /
    prompt-lookup decoding drops rejected candidate tokens (with an assistant model the prefill
    itself ends with candidates), a deferred stop check undoes a step. Every layer loses the same
    number of tokens, pruned or not; a positive argument (the legacy absolute length, in the
    original coordinates ``get_seq_length`` reports) is turned into that number."""
    if "crop" in cache.__dict__ or not callable(getattr(type(cache), "crop", None)):
        return
    import weakref

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

