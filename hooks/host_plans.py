"""Where a prefill's visual tokens are, and its first stage's plan, prepared on the host.

A prefill with images locates its visual tokens from ``input_ids`` (and the adapter's layout
inputs, e.g. image sizes) and prepares the first stage's candidates on the host
(:func:`vtoken.hooks.prefill_plan.prepare_prefill`): no device syncs. Plans are cached per model
(:func:`plan_cache_for`), keyed by the inputs that determine them (:func:`plan_key`), so a
repeated prompt shape costs a dict lookup.

Two moments: :func:`plan_before_vision` (the multimodal forward starts: copy the inputs to the
host before the vision tower runs, and plan if the adapter can lay out from the inputs alone)
and :func:`plan_at_text_call` (the language model starts: the features exist, so every adapter
can lay out; the plan must match the sequence the language model was given).
"""

from __future__ import annotations

import weakref

import torch

from vtoken.hooks.masks import key_validity
from vtoken.hooks.prefill_plan import PlanCache, prepare_prefill

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


def plan_key(rt, ids_host, mask_host, inputs: dict, device):
    """The PlanCache key of a prefill, or None when its plan is not cached (cache off, or an
    adapter whose layout needs the forward's features or does not declare its inputs)."""
    names = rt.adapter.layout_inputs
    if names is None or rt.plans.size <= 0 or rt.adapter.layout_needs_features:
        return None
    device = torch.device(device)
    # a plan is uploaded without blocking on the stream of the call that made it: another
    # stream gets its own plan rather than one whose copy may not have landed for it
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    return PlanCache.key(ids_host, mask_host, {n: inputs.get(n) for n in names}, rt.plan[0].keep,
                         (str(device), stream))


def plan_before_vision(rt, ctx, kwargs: dict) -> None:
    """A prefill with images: copy ``input_ids`` and the 2-D mask to the host now (before the
    vision tower runs, so the copy waits for nothing; or take the caller's copies, see
    :meth:`vtoken.hooks.PruningHandle.host_inputs`) and, when the adapter can lay out the visual
    tokens from the inputs alone, prepare the first stage on the host."""
    input_ids = kwargs["input_ids"]
    ctx.checks = []
    given = getattr(rt.tls, "host_inputs", None)  # the caller's copies (PruningHandle.host_inputs)
    if given is not None and tuple(given[0].shape) == tuple(input_ids.shape) \
            and (given[1] is None or tuple(given[1].shape) == tuple(input_ids.shape)):
        ctx.ids_host, ctx.mask_host = given[:2]
    else:
        ctx.ids_host = input_ids.cpu()
        # a 2-D mask, or the 4-D one transformers < 5.2x's generate passes with a static cache
        # (B, 1, q, slots): the prompt's columns of its last row
        mask = key_validity(kwargs.get("attention_mask"))
        if mask is not None and mask.shape[0] == input_ids.shape[0] and mask.shape[1] >= input_ids.shape[1]:
            ctx.mask_host = mask[:, :input_ids.shape[1]].cpu().bool()
    if rt.adapter.layout_needs_features:
        return
    key = plan_key(rt, ctx.ids_host, ctx.mask_host, kwargs, input_ids.device)
    ctx.prepared = rt.plans.get(key) if key is not None else None
    if ctx.prepared is not None:
        return
    layout = rt.adapter.layout(ctx.ids_host, kwargs, ctx)
    if layout is not None:
        valid = ctx.mask_host if ctx.mask_host is not None else torch.ones(input_ids.shape, dtype=torch.bool)
        ctx.prepared = prepare_prefill(layout, valid, rt.plan[0].keep, input_ids.device)
        if key is not None:
            rt.plans.put(key, ctx.prepared)


def plan_at_text_call(rt, ctx, embeds, mask2d, B: int, q: int) -> bool:
    """The language model's call of a prefill (``ctx.inputs`` set) or of a no-cache step: make
    ``ctx.prepared`` the plan of the (B, q) sequence it was given (``embeds`` (B, q, D)); sets
    ``ctx.orig_valid``. Returns False when the call has no visual tokens (nothing to prune)."""
    if ctx.prepared is not None and tuple(ctx.prepared.layout.segment_of.shape) != (B, q):
        ctx.prepared = None  # the language model got another sequence than input_ids: lay out again
    key = None
    if ctx.inputs is not None and ctx.prepared is None:  # a prefill: locate the visual tokens now that features exist
        ids = ctx.ids_host if ctx.ids_host is not None else ctx.inputs["input_ids"].cpu()
        if mask2d is not None and (ctx.mask_host is None or tuple(ctx.mask_host.shape) != (B, q)):
            ctx.mask_host = mask2d.cpu().bool()
        key = plan_key(rt, ids, None if mask2d is None else ctx.mask_host, ctx.inputs, embeds.device)
        ctx.prepared = rt.plans.get(key) if key is not None else None
        if ctx.prepared is not None and tuple(ctx.prepared.layout.segment_of.shape) != (B, q):
            ctx.prepared = key = None  # the plan of input_ids, for another sequence: not this one
        if ctx.prepared is None:
            ctx.layout = rt.adapter.layout(ids, ctx.inputs, ctx)
    ctx.inputs = None
    if ctx.layout is None and ctx.prepared is None:
        return False
    dev = embeds.device
    ctx.orig_valid = mask2d.bool() if mask2d is not None else torch.ones(B, q, dtype=torch.bool, device=dev)
    if ctx.prepared is None:
        structural = rt.adapter.structural_from_embeds(embeds, ctx.layout)
        if structural is not None:
            _refine_structural(ctx.layout, structural)
        if mask2d is None:
            valid = torch.ones(B, q, dtype=torch.bool)
        elif ctx.mask_host is not None and tuple(ctx.mask_host.shape) == (B, q):
            valid = ctx.mask_host
        else:
            valid = ctx.orig_valid.cpu()
        ctx.prepared = prepare_prefill(ctx.layout, valid, rt.plan[0].keep, dev)
        if key is not None:
            rt.plans.put(key, ctx.prepared)
    ctx.layout = ctx.prepared.layout
    return True


def may_drop(plan, prep) -> bool:
    """Whether ``plan`` may drop a visual token of the prefill ``prep`` (host arithmetic, no sync):
    some stage's budget is below a segment's count, or a stage chooses its own count (adaptive)."""
    from vtoken.plan import tokens_for

    counts = prep.seg_count_host
    return any(getattr(st.scorer, "adaptive", False) or any(tokens_for(st.keep, c) < c for c in counts)
               for st in plan)


def _refine_structural(layout, structural: torch.Tensor) -> None:
    """Tokens the embeddings mark as structural (e.g. LLaVA-NeXT's row newlines) are never pruned:
    recount the prunable tokens per segment, and drop grids that no longer tile them."""
    layout.structural = structural.to(layout.segment_of.device) & layout.visual
    S = layout.num_segments
    seg = layout.segment_of[layout.prunable]
    layout.seg_count = torch.bincount(seg, minlength=S)
    layout.seg_grid = [g if g is not None and g[0] * g[1] * g[2] == int(c) else None
                       for g, c in zip(layout.seg_grid, layout.seg_count.tolist())]
