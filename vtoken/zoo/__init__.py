"""Reference checkpoints trained here: ``vtoken/tiny-llava``, ``vtoken/tiny-qwen2vl`` and, once trained,
``vtoken/tiny-qwen2vl-video``.

No model can be downloaded on these machines, so vtoken ships two small vision-language models of
the stock ``transformers`` classes, trained from scratch on :mod:`vtoken.data.synthetic` (plus the
``easy-vqa`` train split) by :mod:`vtoken.zoo.train`:

* ``vtoken/tiny-llava``: ``LlavaForConditionalGeneration``, CLIP vision tower at 336 px, 576
  visual tokens per image (24 x 24 patches, [CLS] dropped, penultimate layer), as LLaVA-1.5.
* ``vtoken/tiny-qwen2vl``: ``Qwen2VLForConditionalGeneration``, dynamic resolution and M-RoPE,
  patch 7 with 2 x 2 merge (one visual token per 14 x 14 pixels); images are kept between 336 and
  672 pixels a side, so at least 576 visual tokens (576 at the default 336 px).
* ``vtoken/tiny-qwen2vl-video``: the same Qwen2-VL shape trained on :mod:`vtoken.data.synthetic_video`
  clips (8 frames of 112 px, 256 visual tokens) and the images above, by
  ``OUT=dir bash vtoken/zoo/train_video.sh`` on a GPU (not shipped until that run is unpacked into
  ``vtoken/zoo/checkpoints/``). :func:`answer` takes a video as a list of frames.

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
    "vtoken/tiny-qwen2vl-video": os.path.join(_CKPT_DIR, "tiny-qwen2vl-video"),
}
_ALIASES = {"tiny-llava": "vtoken/tiny-llava", "tiny-qwen2vl": "vtoken/tiny-qwen2vl",
            "tiny-qwen2vl-video": "vtoken/tiny-qwen2vl-video"}
#: how to make a built-in checkpoint that is not installed
_HOW_TO_TRAIN = {
    "vtoken/tiny-qwen2vl-video": "train it on a GPU with `OUT=dir bash vtoken/zoo/train_video.sh` (about 8 minutes) "
                                 "and unpack dir/tiny-qwen2vl-video.tar into vtoken/zoo/checkpoints/",
}


def available() -> list[str]:
    """Built-in checkpoint names whose files are present."""
    return [n for n, p in BUILTIN.items() if os.path.exists(os.path.join(p, "config.json"))]


def resolve(name_or_path: str) -> str:
    """Local folder of a built-in name (``vtoken/tiny-llava``, ``vtoken/tiny-qwen2vl``) or a path."""
    name = _ALIASES.get(name_or_path, name_or_path)
    if name in BUILTIN:
        path = BUILTIN[name]
        if not os.path.exists(os.path.join(path, "config.json")):
            how = _HOW_TO_TRAIN.get(name, "train it with `python -m vtoken.zoo.train`")
            raise FileNotFoundError(f"built-in checkpoint {name!r} is not installed: expected {path}/config.json ({how})")
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
    obj = getattr(obj, "__wrapped__", obj)  # a wrapped processor (vtoken.eval.memo.MemoProcessor)
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


def build_prompt(processor_or_arch, question: str, video: bool = False) -> str:
    """The exact training prompt for ``question``, with the architecture's image (or video) placeholder."""
    from vtoken.zoo.build import prompt

    return prompt(arch_of(processor_or_arch), question, video=video)


def _is_video(item) -> bool:
    """A video: a list / tuple of frames (PIL images or arrays), or a (T, H, W, 3) array."""
    return isinstance(item, (list, tuple)) or getattr(item, "ndim", 0) == 4


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

    An item of ``images`` may be a video instead (a list of frames, or a (T, H, W, 3) uint8 array;
    Qwen2-VL checkpoints only): it goes through the processor's ``videos=`` path with the video
    placeholder in the prompt.

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
    is_video = [_is_video(v) for v in images]
    if any(is_video) and not all(is_video):  # one call per kind, answers in the given order
        out: list = [None] * len(questions)
        for kind in (True, False):
            idx = [i for i, v in enumerate(is_video) if v == kind]
            got = answer(model, processor, [images[i] for i in idx], [questions[i] for i in idx],
                         max_new_tokens=max_new_tokens, batch_size=batch_size, **generate_kwargs)
            for i, a in zip(idx, got):
                out[i] = a
        return out
    video = bool(is_video[0])
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
        texts = [build_prompt(processor, q, video=video) for q in questions]
        if video:
            visual = {"videos": [[_as_rgb(f) for f in v] for v in images]}
        else:
            visual = {"images": [_as_rgb(im) for im in images]}
        inputs = processor(**visual, text=texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old_side
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in inputs.items()}
    for px in ("pixel_values", "pixel_values_videos"):
        if px in inputs and inputs[px].is_floating_point():
            inputs[px] = inputs[px].to(dtype)
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
