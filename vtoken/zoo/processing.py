"""Processor loading that works with and without torchvision.

``transformers`` 5.x builds ``Qwen2VLProcessor`` with a video processor, and every video processor
needs torchvision. The CPU machines here (CI included) have no torchvision, so
``AutoProcessor.from_pretrained`` fails on any Qwen2-VL checkpoint there. :func:`load_processor`
tries ``AutoProcessor`` first (PIL image backend, so both machines resize images identically) and
falls back to :class:`Qwen2VLImageOnlyProcessor`: the same processor class, images and text only.

Saved checkpoints always name the stock ``Qwen2VLProcessor`` (see :func:`save_processor`), so a
machine with torchvision loads them with plain ``AutoProcessor.from_pretrained(path)``.
"""

from __future__ import annotations

import json
import os

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

__all__ = [
    "Qwen2VLImageOnlyProcessor", "load_processor", "patchify", "save_processor", "torchvision_available",
    "video_inputs",
]


def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without torchvision: images and text through the stock code, videos
    (``videos=``: one list of PIL frames or a ``(T, H, W, 3)`` uint8 array per video) through
    :func:`video_inputs`, the stock video processor's arithmetic in plain torch (frames resized with
    PIL's bicubic when their size is not already the processor's; the synthetic clips never are)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, video_pixels=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        #: (min_pixels, max_pixels) of a video frame (the saved video processor's size)
        self.video_pixels = tuple(video_pixels) if video_pixels else _image_pixels(image_processor)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is None:
            return super().__call__(images=images, text=text, **kwargs)
        if images is not None:
            raise ValueError("the torchvision-free Qwen2-VL processor takes images or videos in one call, not both")
        from transformers import BatchFeature

        ip = self.image_processor
        vin = video_inputs(videos, ip.image_mean, ip.image_std, ip.rescale_factor, ip.patch_size,
                           ip.temporal_patch_size, ip.merge_size, *self.video_pixels)
        texts = [text] if isinstance(text, str) else list(text)
        counts = iter(int(g.prod()) // ip.merge_size**2 for g in vin["video_grid_thw"])
        expanded = []
        for t in texts:
            parts = t.split(self.video_token)
            out = parts[0]
            for rest in parts[1:]:
                out += "<|VTOKEN_VIDEO|>" * next(counts) + rest
            expanded.append(out.replace("<|VTOKEN_VIDEO|>", self.video_token))
        if next(counts, None) is not None:
            raise ValueError(f"{len(vin['video_grid_thw'])} videos but fewer {self.video_token} placeholders in the text")
        return_tensors = kwargs.pop("return_tensors", None)
        enc = self.tokenizer(expanded, padding=kwargs.pop("padding", False), return_tensors="pt")
        data = dict(enc)
        data["mm_token_type_ids"] = (enc["input_ids"] == self.video_token_id).long() * 2
        data.update(vin)
        return BatchFeature(data, tensor_type=return_tensors)


def _image_pixels(ip) -> tuple:
    size = getattr(ip, "size", None) or {}
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    lo = get("shortest_edge") or getattr(ip, "min_pixels", None) or 56 * 56
    hi = get("longest_edge") or getattr(ip, "max_pixels", None) or 28 * 28 * 1280
    return int(lo), int(hi)


def patchify(x, patch: int, temporal_patch: int, merge: int):
    """Qwen2-VL's flattened patches of normalised frames, as its image / video processors lay them out.

    x: (B, T, C, H, W) with T a multiple of ``temporal_patch`` and H, W multiples of
    ``patch * merge``. Returns (B * T/tp * H/p * W/p, C * tp * p * p) patches (each merge window's
    patches consecutive) and the (B, 3) grid ``[T/tp, H/p, W/p]``.
    """
    import torch

    B, T, C, H, W = x.shape
    p, tp, m = patch, temporal_patch, merge
    gt, gh, gw = T // tp, H // p, W // p
    x = x.reshape(B, gt, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    x = x.reshape(B * gt * gh * gw, C * tp * p * p)
    grid = torch.tensor([[gt, gh, gw]] * B, dtype=torch.long, device=x.device)
    return x, grid


def video_inputs(videos, mean, std, rescale, patch, temporal_patch, merge, min_pixels, max_pixels) -> dict:
    """``pixel_values_videos`` (float32) and ``video_grid_thw`` of ``videos`` (each a list of PIL
    frames or a (T, H, W, 3) uint8 array), as ``Qwen2VLVideoProcessor`` computes them: frames
    resized to :func:`smart_resize`'s size, the last frame repeated to a multiple of the temporal
    patch, rescaled, normalised and patchified (:func:`patchify`)."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        videos = [videos]
    pix, grids = [], []
    for v in videos:
        frames = [np.asarray(f.convert("RGB") if hasattr(f, "convert") else f, dtype=np.uint8) for f in v]
        if not frames:
            raise ValueError("a video needs at least one frame")
        h, w = frames[0].shape[:2]
        rh, rw = smart_resize(h, w, patch * merge, min_pixels, max_pixels)
        if (rh, rw) != (h, w):
            frames = [np.asarray(Image.fromarray(f).resize((rw, rh), Image.BICUBIC)) for f in frames]
        frames += [frames[-1]] * (-len(frames) % temporal_patch)
        x = torch.from_numpy(np.stack(frames)).float() * rescale
        x = (x - torch.tensor(mean)) / torch.tensor(std)
        flat, grid = patchify(x.permute(0, 3, 1, 2)[None].contiguous(), patch, temporal_patch, merge)
        pix.append(flat)
        grids.append(grid)
    return {"pixel_values_videos": torch.cat(pix), "video_grid_thw": torch.cat(grids)}


def _video_processor_config(processor) -> dict:
    image_processor = processor.image_processor
    lo, hi = processor.video_pixels
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "size": {"shortest_edge": lo, "longest_edge": hi},
        "patch_size": image_processor.patch_size,
        "temporal_patch_size": image_processor.temporal_patch_size,
        "merge_size": image_processor.merge_size,
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
    }


def save_processor(processor, path: str) -> None:
    """``processor.save_pretrained(path)``, naming the stock processor class in the saved files."""
    processor.save_pretrained(path)
    if not isinstance(processor, Qwen2VLImageOnlyProcessor):
        return
    for name in ("processor_config.json", "tokenizer_config.json"):
        f = os.path.join(path, name)
        if not os.path.exists(f):
            continue
        with open(f) as fh:
            cfg = json.load(fh)
        cfg["processor_class"] = "Qwen2VLProcessor"
        if name == "processor_config.json" and "video_processor" not in cfg:
            cfg["video_processor"] = _video_processor_config(processor)
        with open(f, "w") as fh:
            json.dump(cfg, fh, indent=2, sort_keys=True)


def _saved_video_pixels(path: str):
    """(min_pixels, max_pixels) of the video processor saved at ``path``, or None."""
    with open(os.path.join(path, "processor_config.json")) as fh:
        vp = json.load(fh).get("video_processor") or {}
    size = vp.get("size") or {}
    lo, hi = size.get("shortest_edge", vp.get("min_pixels")), size.get("longest_edge", vp.get("max_pixels"))
    return (lo, hi) if lo and hi else None


def load_processor(path: str, padding_side: str = "left"):
    """The processor saved at ``path`` (PIL image backend), with or without torchvision."""
    # module paths: transformers 5.17 exposes a torchvision-only placeholder at top level
    from transformers.models.auto.image_processing_auto import AutoImageProcessor
    from transformers.models.auto.processing_auto import AutoProcessor
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(path, backend="pil")
    except Exception:  # Qwen2-VL's video processor needs torchvision
        with open(os.path.join(path, "processor_config.json")) as fh:
            cls = json.load(fh).get("processor_class")
        if cls != "Qwen2VLProcessor":
            raise
        proc = Qwen2VLImageOnlyProcessor(
            image_processor=AutoImageProcessor.from_pretrained(path, backend="pil"),
            tokenizer=AutoTokenizer.from_pretrained(path),
            video_pixels=_saved_video_pixels(path),
        )
    if not type(proc.image_processor).__name__.endswith("Pil"):
        # same resize arithmetic on every machine: the checkpoints were trained on PIL's
        proc.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    proc.tokenizer.padding_side = padding_side
    return proc
