"""Model loading for the demo: the device and dtype the command line asks for, the built-in or
random-weight models (``tiny-random`` / ``tiny-random-qwen2vl``) or a checkpoint folder, and the
prompt for one image and a question.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

DEFAULT_MODEL = "vtoken/tiny-llava"
RANDOM_MODEL = "tiny-random"  # a randomly initialised LLaVA of the tiny-llava shape (answers are noise)
RANDOM_MODELS = {RANDOM_MODEL: "llava", "tiny-random-qwen2vl": "qwen2vl"}  # name -> vtoken.zoo.build arch


def _pick_device(device: Optional[str]) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} asked for, but torch sees no CUDA device")
    return device


def _pick_dtype(dtype: Optional[str], device: str):
    import torch

    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise SystemExit(f"--dtype must be auto, float32, bfloat16 or float16; got {dtype!r}") from None


def build_random_model(arch: str = "llava"):
    """A randomly initialised model of the shipped checkpoints' shape (``llava`` or ``qwen2vl``),
    with its offline processor."""
    from vtoken.zoo import build

    tok = build.build_tokenizer()
    return build.build_model(arch, tok).eval(), build.build_processor(arch, tok)


def load_model(name_or_path: str, device: str, dtype):
    """``(model, processor, note)``; ``note`` is a warning for the page ("" when none).

    ``tiny-random`` (``tiny-random-qwen2vl``) builds a random-weight LLaVA (Qwen2-VL) of the
    shipped checkpoints' shape, for tests. Other names go through
    ``vtoken.zoo.load`` when it exists, else through ``transformers``' Auto classes. If the default
    checkpoint is missing (a checkout before it was trained), falls back to random weights with a
    warning rather than failing.
    """
    note = ""
    if name_or_path in RANDOM_MODELS:
        model, processor = build_random_model(RANDOM_MODELS[name_or_path])
        note = f"Random-weight model ({name_or_path}): answers are noise; timings and pruning are real."
    else:
        zoo = importlib.import_module("vtoken.zoo")
        try:
            if hasattr(zoo, "load"):
                model, processor = zoo.load(name_or_path, device=device, dtype=dtype)
            else:
                model, processor = _load_with_transformers(name_or_path, dtype)
        except Exception as exc:
            if name_or_path != DEFAULT_MODEL:
                raise
            print(f"[vtoken demo] could not load {DEFAULT_MODEL} ({exc}); using random weights", file=sys.stderr)
            model, processor = build_random_model()
            note = f"{DEFAULT_MODEL} could not be loaded ({exc}); using random weights: answers are noise."
    model = model.to(device=device, dtype=dtype).eval()
    return model, processor, note


def _load_with_transformers(name_or_path: str, dtype):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = name_or_path
    if name_or_path == DEFAULT_MODEL:
        path = str(Path(importlib.import_module("vtoken.zoo").__file__).parent / "checkpoints" / "tiny-llava")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    return model, processor


def build_prompt(processor, question: str, placeholder: Optional[str] = None) -> str:
    """The prompt for one image and ``question``: the processor's chat template when it has one
    (released checkpoints), else ``vtoken.zoo.build_prompt`` (the shipped checkpoints' training
    prompt), else LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:`` with ``placeholder`` standing for
    the image (the model's ``Adapter.image_placeholder``; None: the processor's ``image_token`` or
    ``<image>``)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    zoo = importlib.import_module("vtoken.zoo")
    if hasattr(zoo, "build_prompt"):
        try:
            return zoo.build_prompt(processor, question)
        except (TypeError, ValueError):
            pass
    if placeholder is None:
        placeholder = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {placeholder}\n{question} ASSISTANT:"

