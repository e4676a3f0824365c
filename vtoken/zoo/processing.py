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

__all__ = ["Qwen2VLImageOnlyProcessor", "load_processor", "save_processor", "torchvision_available"]


def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor (images and text only; no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def _video_processor_config(image_processor) -> dict:
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "min_pixels": image_processor.min_pixels if hasattr(image_processor, "min_pixels") else 128 * 28 * 28,
        "max_pixels": image_processor.max_pixels if hasattr(image_processor, "max_pixels") else 768 * 28 * 28,
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
            cfg["video_processor"] = _video_processor_config(processor.image_processor)
        with open(f, "w") as fh:
            json.dump(cfg, fh, indent=2, sort_keys=True)


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
        )
    if not type(proc.image_processor).__name__.endswith("Pil"):
        # same resize arithmetic on every machine: the checkpoints were trained on PIL's
        proc.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    proc.tokenizer.padding_side = padding_side
    return proc
