"""Answering one batch of lmms-eval requests: the generation settings a task asks for, the visuals
of each document, and the answer function :class:`~vtoken.eval.backend.ModelBackend` calls.

* Built-in checkpoints (``vtoken.zoo``): :func:`vtoken.zoo.answer`, the function ``vtoken eval``
  uses (their training prompt, one image per question; the Qwen2-VL ones also one video, as
  ``vtoken/tiny-qwen2vl-video`` is trained).
* Any other ``transformers`` VLM: one image per question goes through
  :func:`vtoken.eval.backend.hf_answer` (``vtoken eval``'s path: the processor's chat template, the
  image, then the text); several images, a video or no visual use the same chat-template layout with
  one ``{"type": "image"}`` / ``{"type": "video"}`` entry per visual (video frames sampled uniformly,
  ``max_frames`` of them). Video needs a model whose config declares a video token (LLaVA-OneVision,
  Qwen2-VL, Qwen2.5-VL, Qwen3-VL); the others are refused with that reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from vtoken.errors import UnsupportedCallError

__all__ = ["GenerationSettings", "generation_settings", "truncate_at", "doc_visuals", "answer_function",
           "DEFAULT_MAX_NEW_TOKENS"]

DEFAULT_MAX_NEW_TOKENS = 128
_IMAGE_PLACEHOLDERS = ("<image>",)


@dataclass
class GenerationSettings:
    max_new_tokens: int
    until: list = field(default_factory=list)
    #: extra ``generate`` arguments; empty for greedy search (the answers ``vtoken eval`` gives)
    extra: dict = field(default_factory=dict)


def generation_settings(gen_kwargs: dict, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> GenerationSettings:
    """A task's ``generation_kwargs`` → settings. Greedy unless the task samples (``do_sample`` or a
    temperature > 0) or asks for beam search."""
    g = dict(gen_kwargs or {})
    until = g.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)):
        raise ValueError(f"generation_kwargs['until'] must be a string or a list of strings, got {until!r}")
    max_new = int(g.pop("max_new_tokens", None) or default_max_new_tokens)
    temperature = float(g.get("temperature") or 0)
    sample = bool(g.get("do_sample")) or temperature > 0
    extra = {}
    if sample:
        extra.update(do_sample=True, temperature=temperature or 1.0)
        if g.get("top_p") is not None:
            extra["top_p"] = float(g["top_p"])
    num_beams = int(g.get("num_beams") or 1)
    if num_beams > 1:
        extra["num_beams"] = num_beams
    return GenerationSettings(max_new, [u for u in until if u], extra)


def truncate_at(text: str, until: list) -> str:
    """``text`` cut before the first stop string (lmms-eval's ``until``)."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text


def doc_visuals(doc_to_visual, doc) -> list:
    """A document's visuals as a flat list (PIL images; a video is a path string)."""
    out = doc_to_visual(doc) if doc_to_visual is not None else []
    flat = []
    for v in out or []:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    return [v for v in flat if v is not None]


def _is_video(v) -> bool:
    """A video file path, or a video given as its frames (a list / tuple, as ``vtoken eval``'s
    synthetic-video samples)."""
    return isinstance(v, (str, list, tuple)) or hasattr(v, "__fspath__")


def _zoo_answer(model, processor, visuals, contexts, max_new_tokens: int = 16, max_frames: int = 8,
                **generate_kwargs) -> list:
    from vtoken import zoo

    takes_video = getattr(getattr(model, "config", None), "video_token_id", None) is not None
    images = []
    for i, vs in enumerate(visuals):
        if len(vs) != 1 or (_is_video(vs[0]) and not takes_video):
            kinds = ", ".join("video" if _is_video(v) else "image" for v in vs) or "nothing"
            raise UnsupportedCallError(
                f"vtoken's built-in checkpoints answer one image per question (the Qwen2-VL ones: or one video); "
                f"request {i} gives {kinds}. Evaluate multi-image or other video tasks with a Hugging Face VLM "
                "(pretrained=PATH)")
        images.append(_load_frames(vs[0], max_frames) if _is_video(vs[0]) else vs[0])
    return zoo.answer(model, processor, images, contexts, max_new_tokens=max_new_tokens, **generate_kwargs)


def _video_token(model):
    cfg = model.config
    return getattr(cfg, "video_token_id", None) or getattr(cfg, "video_token_index", None)


def _load_frames(path, max_frames: int):
    if isinstance(path, (list, tuple)):  # frames already: sampled uniformly down to max_frames
        step = max(1, -(-len(path) // max_frames))
        return list(path)[::step]
    from transformers.video_utils import load_video

    video = load_video(str(path), num_frames=max_frames)
    return video[0] if isinstance(video, tuple) else video


def _prompt(processor, content: list) -> str:
    """The chat-template prompt of one user turn; without a template, LLaVA-1.5's plain format (as
    :func:`vtoken.eval.backend.hf_answer`) with one placeholder per image / video."""
    try:
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    except Exception:  # noqa: BLE001 - no chat template
        marks = {"image": getattr(processor, "image_token", "<image>"),
                 "video": getattr(processor, "video_token", "<video>")}
        visual = "".join(marks[c["type"]] for c in content if c["type"] in marks)
        text = next(c["text"] for c in content if c["type"] == "text")
        return f"USER: {visual}\n{text} ASSISTANT:"


def _chat_answer(model, processor, visuals, contexts, max_new_tokens: int = 16, max_frames: int = 8,
                 **generate_kwargs) -> list:
    import torch

    from vtoken.eval.backend import hf_answer

    one_image = all(len(vs) == 1 and not _is_video(vs[0]) for vs in visuals)
    if one_image and "do_sample" not in generate_kwargs:  # vtoken eval's path (greedy), unchanged
        return hf_answer(model, processor, [vs[0] for vs in visuals], contexts, max_new_tokens=max_new_tokens,
                         **generate_kwargs)
    has_video = any(_is_video(v) for vs in visuals for v in vs)
    if has_video and _video_token(model) is None:
        raise UnsupportedCallError(
            f"{type(model).__name__} takes no video input (its config declares no video token); video tasks need "
            "LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL or Qwen3-VL")
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    prompts, images, videos = [], [], []
    for vs, text in zip(visuals, contexts):
        for ph in _IMAGE_PLACEHOLDERS:
            text = text.replace(ph, "")
        content = []
        for v in vs:
            if _is_video(v):
                content.append({"type": "video"})
                videos.append(_load_frames(v, max_frames))
            else:
                content.append({"type": "image"})
                images.append(v.convert("RGB") if getattr(v, "mode", "RGB") != "RGB" else v)
        content.append({"type": "text", "text": text.strip()})
        prompts.append(_prompt(processor, content))
    kwargs = {"text": prompts, "padding": True, "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    inputs = processor(**kwargs)
    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
              if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens,
                             **{"do_sample": False, "pad_token_id": tok.pad_token_id, **generate_kwargs})
    new = out[:, inputs["input_ids"].shape[1]:]
    return [s.strip() for s in processor.batch_decode(new, skip_special_tokens=True)]


def answer_function(source: str, settings: GenerationSettings, max_frames: int = 8):
    """The ``answer_fn`` for :class:`~vtoken.eval.backend.ModelBackend`: called with
    ``(model, processor, visuals, contexts, max_new_tokens=...)``, ``visuals`` one list per request."""
    if source == "vtoken.zoo":
        return functools.partial(_zoo_answer, max_frames=max_frames, **settings.extra)
    return functools.partial(_chat_answer, max_frames=max_frames, **settings.extra)
