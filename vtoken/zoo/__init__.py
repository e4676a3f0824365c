"""Reference checkpoints trained here: ``vtoken/tiny-llava`` and ``vtoken/tiny-qwen2vl``.

No model can be downloaded on these machines, so vtoken ships two small vision-language models of
the stock ``transformers`` classes, trained from scratch on :mod:`vtoken.data.synthetic` (plus the
``easy-vqa`` train split) by :mod:`vtoken.zoo.train`:

* ``vtoken/tiny-llava``: ``LlavaForConditionalGeneration``, CLIP vision tower at 336 px, 576
  visual tokens per image (24 x 24 patches, [CLS] dropped, penultimate layer), as LLaVA-1.5.
* ``vtoken/tiny-qwen2vl``: ``Qwen2VLForConditionalGeneration``, dynamic resolution and M-RoPE,
  patch 7 with 2 x 2 merge (one visual token per 14 x 14 pixels); images are kept between 336 and
  672 pixels a side, so at least 576 visual tokens (576 at the default 336 px).

    from vtoken import zoo
    model, processor = zoo.load("vtoken/tiny-llava")
    zoo.answer(model, processor, [image], ["how many objects are there?"])   # -> ["5"]

Each checkpoint folder holds ``TRAINING.md`` (command, time, device) and ``metrics.json`` (measured
accuracies).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

__all__ = [
    "BUILTIN",
    "available",
    "resolve",
    "load",
    "load_processor",
    "arch_of",
    "build_prompt",
    "answer",
    "metrics",
]

_CKPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
BUILTIN: dict[str, str] = {
    "vtoken/tiny-llava": os.path.join(_CKPT_DIR, "tiny-llava"),
    "vtoken/tiny-qwen2vl": os.path.join(_CKPT_DIR, "tiny-qwen2vl"),
}
_ALIASES = {"tiny-llava": "vtoken/tiny-llava", "tiny-qwen2vl": "vtoken/tiny-qwen2vl"}


def available() -> list[str]:
    """Built-in checkpoint names whose files are present."""
    return [n for n, p in BUILTIN.items() if os.path.exists(os.path.join(p, "config.json"))]


def resolve(name_or_path: str) -> str:
    """Local folder of a built-in name (``vtoken/tiny-llava``, ``vtoken/tiny-qwen2vl``) or a path."""
    name = _ALIASES.get(name_or_path, name_or_path)
    if name in BUILTIN:
        path = BUILTIN[name]
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"built-in checkpoint {name!r} is not installed: expected {path}/config.json "
                "(train it with `python -m vtoken.zoo.train`)"
            )
        return path
    if os.path.isdir(name_or_path):
        return name_or_path
    raise FileNotFoundError(
        f"expected a built-in checkpoint name {sorted(BUILTIN)} or a local folder, got {name_or_path!r} "
        "(no model hub is reachable here)"
    )


def metrics(name_or_path: str) -> dict:
    """The ``metrics.json`` recorded when the checkpoint was trained ({} if none)."""
    f = os.path.join(resolve(name_or_path), "metrics.json")
    if not os.path.exists(f):
        return {}
    with open(f) as fh:
        return json.load(fh)


def load_processor(name_or_path: str):
    """The checkpoint's processor (PIL image backend, left padding; no torchvision needed)."""
    from vtoken.zoo.processing import load_processor as _load

    return _load(resolve(name_or_path), padding_side="left")


def load(name_or_path: str, device="cpu", dtype=None, attn_implementation: str = "sdpa"):
    """``(model, processor)`` of a built-in name or a local checkpoint folder, in eval mode.

    dtype defaults to float32 on the CPU and bfloat16 on CUDA (checkpoints are stored in float16).
    """
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import AutoModelForImageTextToText

    path = resolve(name_or_path)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cfg = AutoConfig.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, config=cfg, dtype=dtype, attn_implementation=attn_implementation
    )
    model.to(device).eval()
    return model, load_processor(path)


def arch_of(obj) -> str:
    """``"llava"`` or ``"qwen2vl"`` for a processor, a model, a config, or an arch string."""
    if isinstance(obj, str):
        if obj in ("llava", "qwen2vl"):
            return obj
        raise ValueError(f"arch must be 'llava' or 'qwen2vl', got {obj!r}")
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    if model_type == "llava":
        return "llava"
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return "qwen2vl"
    name = type(obj).__name__
    if "Llava" in name:
        return "llava"
    if "Qwen2VL" in name or "Qwen2_5_VL" in name:
        return "qwen2vl"
    raise ValueError(f"cannot tell the architecture of a {name}: expected a LLaVA or Qwen2-VL processor/model")


def build_prompt(processor_or_arch, question: str) -> str:
    """The exact training prompt for ``question``, with the architecture's image placeholder."""
    from vtoken.zoo.build import prompt

    return prompt(arch_of(processor_or_arch), question)


def _as_rgb(image):
    from PIL import Image

    if isinstance(image, str):
        image = Image.open(image)
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


def answer(
    model,
    processor,
    images: Sequence,
    questions: Sequence[str],
    max_new_tokens: int = 4,
    batch_size: int | None = None,
    **generate_kwargs,
) -> list[str]:
    """Greedy answers to ``questions`` about ``images`` (one image per question), batched.

    Prompts are left-padded so every row's next token follows its own prompt. Returns the decoded
    new text of each row (special tokens removed, stripped), e.g. ``["red", "3"]``.
    ``batch_size`` splits long lists into chunks (default: all at once).
    """
    import torch

    images, questions = list(images), list(questions)
    if len(images) != len(questions):
        raise ValueError(f"expected one image per question, got {len(images)} images and {len(questions)} questions")
    if not questions:
        return []
    if batch_size is not None and len(questions) > batch_size:
        out: list[str] = []
        for i in range(0, len(questions), batch_size):
            out += answer(
                model, processor, images[i : i + batch_size], questions[i : i + batch_size],
                max_new_tokens=max_new_tokens, **generate_kwargs,
            )
        return out
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        texts = [build_prompt(processor, q) for q in questions]
        inputs = processor(images=[_as_rgb(im) for im in images], text=texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old_side
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in inputs.items()}
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    kwargs.update(generate_kwargs)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
