"""Checkpoint layout that both transformers 5 and vLLM load, for LLaVA's CLIP vision tower.

transformers 5 dropped the ``vision_model`` level of ``CLIPVisionModel`` and saves a LLaVA's tower
as ``vision_tower.embeddings...``; it still loads the older ``vision_tower.vision_model.embeddings...``
(its conversion mapping removes that prefix), which is the layout of the published LLaVA checkpoints
(llava-hf/*) and the only one vLLM's ``LlavaForConditionalGeneration`` reads (its ``CLIPVisionModel``
keeps ``vision_model``; otherwise: "There is no module or parameter named 'vision_tower.embeddings'").
:func:`portable_llava_layout` rewrites a saved checkpoint's tensor names to that layout; the tensors
themselves are unchanged.
"""

from __future__ import annotations

import json
import os

OLD, NEW = "vision_tower.", "vision_tower.vision_model."
CLIP_TOWERS = ("clip_vision_model",)


def portable_names(names) -> dict:
    """``{saved name: portable name}`` for the names that change (the CLIP tower's, not yet under
    ``vision_model``); every other name (language model, projector) is already portable."""
    return {k: NEW + k[len(OLD):] for k in names if k.startswith(OLD) and not k.startswith(NEW)}


def portable_llava_layout(path: str) -> int:
    """Rewrite ``path``'s ``model.safetensors`` in place to the portable LLaVA layout when its config
    is a LLaVA with a CLIP tower; returns how many tensors were renamed (0: nothing to do)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with open(os.path.join(path, "config.json")) as fh:
        cfg = json.load(fh)
    if cfg.get("model_type") != "llava" or cfg.get("vision_config", {}).get("model_type") not in CLIP_TOWERS:
        return 0
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, "pt") as f:
        meta = f.metadata() or {}
        names = list(f.keys())
        renamed = portable_names(names)
        if not renamed:
            return 0
        tensors = {renamed.get(k, k): f.get_tensor(k) for k in names}
    tmp = file + ".tmp"
    save_file(tensors, tmp, metadata={**meta, "format": meta.get("format", "pt")})
    os.replace(tmp, file)
    return len(renamed)


__all__ = ["portable_llava_layout", "portable_names"]
