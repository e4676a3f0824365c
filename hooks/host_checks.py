"""transformers' checks that read device values in the middle of a pruned prefill, answered from the
host copies the call already holds (issue 23, item 2).

A pruned prefill with images copies ``input_ids`` and the 2-D mask to the host before the vision
tower runs (:func:`vtoken.hooks.host_plans.plan_before_vision`). Two checks inside transformers'
forward read the same facts back from the device after the tower has been queued, and so make the
host wait for the whole tower before it can queue anything after it (on a GPU each is a
``cudaStreamSynchronize``; a CUDA graph cannot hold one at all):

- ``get_placeholder_mask`` (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) checks
  that the prompt holds one placeholder per feature row, reading the placeholder count (and
  formatting it into the error message) from the device. :func:`install_placeholder_mask` gives the
  multimodal model an instance method that builds the same masks on the device and counts the
  placeholders in the host copy (the same ``ValueError`` on a mismatch); any other call (no host
  copy of these ids, ``inputs_embeds`` instead of ids, a signature it does not know) goes to
  transformers' own method.
- ``create_causal_mask`` asks, with SDPA, whether the 2-D mask is all ones (then it passes no mask
  and SDPA runs causal). :func:`without_full_mask` passes no mask itself when the host copy says it
  is all ones, into an empty cache object, with SDPA: what transformers would have passed after
  reading it.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from vtoken.hooks.kv_cache import cache_arg

#: the ``get_placeholder_mask`` signatures (after ``self``) the host-counted method stands in for
KNOWN_SIGNATURES = (("input_ids", "inputs_embeds", "image_features"),
                    ("input_ids", "inputs_embeds", "image_features", "video_features"))


def _host_ids(runtime, input_ids) -> Optional[torch.Tensor]:
    """The host copy of ``input_ids`` this thread's pruned call made, or None."""
    ctx = runtime.ctx
    ids = getattr(ctx, "ids_host", None) if ctx is not None else None
    return ids if ids is not None and input_ids is not None and tuple(ids.shape) == tuple(input_ids.shape) else None


def install_placeholder_mask(multimodal_model, runtime) -> Optional[Callable[[], None]]:
    """Give ``multimodal_model`` a ``get_placeholder_mask`` that counts placeholders on the host (see
    the module docstring); returns the undo, or None where its method is missing or unknown. The
    check is transformers' own ``torch_compilable_check`` on the host's answer (so
    ``TRANSFORMERS_DISABLE_TORCH_CHECK=1`` turns it off as it does transformers')."""
    cls = type(multimodal_model)
    if getattr(cls, "get_placeholder_mask", None) is None or "get_placeholder_mask" in vars(multimodal_model):
        return None
    names = tuple(inspect.signature(cls.get_placeholder_mask).parameters)[1:]
    if names not in KNOWN_SIGNATURES:
        return None
    from transformers.utils import torch_compilable_check

    kinds = [n[: -len("_features")] for n in names[2:]]  # "image", "video"

    def get_placeholder_mask(input_ids=None, inputs_embeds=None, *features, **named):
        ids_host = _host_ids(runtime, input_ids)
        if ids_host is None or len(features) + len(named) > len(kinds) or set(named) - set(names[2:]):
            # the class's method as it is now (a patch made after the handle was attached included)
            return type(multimodal_model).get_placeholder_mask(multimodal_model, input_ids, inputs_embeds,
                                                               *features, **named)
        given = {**dict(zip(names[2:], features)), **named}
        masks = []
        for kind in kinds:
            token = getattr(multimodal_model.config, f"{kind}_token_id")
            feats = given.get(f"{kind}_features")
            if feats is not None:
                count = int((ids_host == token).sum())
                torch_compilable_check(
                    count * inputs_embeds.shape[-1] == feats.numel(),
                    f"{kind.capitalize()} features and {kind} tokens do not match, tokens: {count}, "
                    f"features: {feats.numel() // max(inputs_embeds.shape[-1], 1)}")
            masks.append((input_ids == token).unsqueeze(-1).to(inputs_embeds.device))
        return masks[0] if len(masks) == 1 else tuple(masks)

    multimodal_model.get_placeholder_mask = get_placeholder_mask

    def undo() -> None:  # (an instance method set by someone else since stays)
        if vars(multimodal_model).get("get_placeholder_mask") is get_placeholder_mask:
            del multimodal_model.get_placeholder_mask
    return undo


def without_full_mask(ctx, attn_impl: str, args: tuple, kwargs: dict) -> Optional[tuple]:
    """``(args, kwargs)`` with ``attention_mask=None`` for the language model's forward of a pruned
    prefill whose 2-D mask is all ones on the host copy, into an empty cache object it was given
    (``generate``'s prefill, the static engine's), with SDPA, not being compiled; else None (the call
    as it was). Without a cache object transformers may read ``position_ids`` for packed sequences
    when no mask is given; compiled, it keeps the mask (5.25 skips it only for a None mask)."""
    mask = kwargs.get("attention_mask")
    host = getattr(ctx, "mask_host", None) if ctx is not None else None
    if (attn_impl != "sdpa" or getattr(ctx, "mode", None) != "prefill" or ctx.fixed is not None
            or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or host is None
            or tuple(host.shape) != tuple(mask.shape) or torch.compiler.is_compiling() or not bool(host.all())):
        return None
    cache = cache_arg(kwargs)
    if cache is None or cache.get_seq_length() != 0:
        return None
    return args, {**kwargs, "attention_mask": None}
