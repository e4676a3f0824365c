"""vtoken's side-by-side demo: the same question answered by the unpruned and the pruned model.

Run (from the repository root)::

    python demos/app.py                       # the shipped vtoken/tiny-llava; CUDA if available, else CPU
    python demos/app.py --model PATH --device cuda --port 7860
    vtoken demo --model PATH                  # the same, through the CLI

Upload an image (or pick a shipped example), ask a question, pick a method and a budget. The left
panel is the unpruned model, the right one the same model with ``vtoken.apply_pruning`` attached;
each shows the answer, time to first token, total time and tokens in context, and the right one a
heatmap of the patches each pruning stage kept, drawn on the image as the model sees it.

Design choices
--------------
* **Concurrency: one model, one lock.** Both answers of a request run while holding
  :attr:`DemoEngine.lock`, and ``apply_pruning`` → ``generate`` → ``handle.remove()`` happens
  entirely inside it (``remove`` in a ``finally``), so no request ever sees another request's hooks
  — the unpruned answer included, which must not run while hooks are attached. A model copy per
  mode would double the memory and still need a lock for the pruned copy (two requests may ask for
  different methods). Gradio's queue runs one request at a time too (``concurrency_limit=1``) so
  waiting users see their place in the queue; the lock is what guarantees isolation, also for
  callers of :meth:`DemoEngine.compare` outside Gradio. Timings are therefore never disturbed by a
  concurrent request.
* **Network: none.** Gradio analytics are off, there is no share link, server-side rendering
  (Node) is off and the theme uses system fonts, so the page renders on an offline machine.
  The server binds 127.0.0.1 unless ``--host`` says otherwise.
* **Input checks** (:func:`load_image`, :func:`check_image_size`): files over 10 MB, images over
  20 megapixels, images more than 20 times wider than tall (or taller than wide), images the
  model's processor would enlarge past 20 megapixels (:func:`expected_processed_size` computes
  that from the processor's resize settings, without resizing) and anything PIL cannot decode are
  refused with a message shown in the page (never a traceback). Sizes are checked from the file's
  header, before any pixel is decoded, and again before every processor call
  (:meth:`DemoEngine._inputs`). The launched demo also lowers PIL's decompression-bomb limit to
  20 megapixels for the whole process (:func:`harden_pil`), so no code path (Gradio's included)
  decodes a bigger image.
* **Heatmap**: kept indices (``handle.stats.stages[i].kept``, visual-token indices of the sample)
  are mapped onto the segment's token grid (``stats.segments[0][0].grid``, 24 × 24 for LLaVA-1.5)
  and drawn over the image the model saw (the processor's resized, centre-cropped pixels); kept
  patches are coloured by the stage's scores when the scorer has them. Without a grid from the
  adapter: LLaVA-NeXT/anyres shows its base-resolution view (whose tokens come first), other
  models the factorisation of the token count closest to the image's aspect ratio.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import importlib
import json
import math
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vtoken.errors import VTokenError

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"

DEFAULT_MODEL = "vtoken/tiny-llava"
RANDOM_MODEL = "tiny-random"  # a randomly initialised LLaVA of the tiny-llava shape (answers are noise)
RANDOM_MODELS = {RANDOM_MODEL: "llava", "tiny-random-qwen2vl": "qwen2vl"}  # name -> vtoken.zoo.build arch
MAX_BYTES = 10 * 1024 * 1024  # 10 MB
MAX_PIXELS = 20_000_000  # 20 megapixels
# Longest side / shortest side. Photos are <= 2:1, panoramas and long screenshots <= ~10:1; past 20:1
# LLaVA-1.5's centre crop keeps under a twentieth of the image, and Qwen2-VL's processor itself
# refuses 200:1. The limit is what stops a tiny 20000 x 10 PNG from becoming a 672000 x 336 resize.
MAX_ASPECT = 20
# The largest image the processor may make (its resize, crop, padding or tiles; see
# expected_processed_size): the upload limit again, so the processor never builds a bigger image than
# an upload may be. LLaVA-1.5 (336 px short side) stays under 2.3 MP at 20:1, LLaVA-NeXT/OneVision
# under their largest grid pinpoint, Qwen2-VL under its max_pixels (12.8 MP for the released
# checkpoints); this catches processors configured bigger than that.
MAX_PROCESSED_PIXELS = MAX_PIXELS
UPLOAD_HARD_LIMIT = "50mb"  # Gradio refuses bigger uploads before they reach our checks
DEFAULT_METHOD = "fastv"


# ----------------------------------------------------------------------------- input checks
class DemoInputError(ValueError):
    """A user input the demo refuses; ``str(exc)`` is the message shown in the page."""


@dataclass
class InvalidUpload:
    """What the tolerant image component hands over when Gradio itself could not read the upload;
    ``message`` (when set) is shown as is, else a generic "not an image" one naming ``reason``."""

    reason: str
    message: str = ""


def harden_pil(max_pixels: int = MAX_PIXELS) -> None:
    """Process-wide decompression-bomb guard, called by :func:`main` before the server starts:
    PIL then warns about any image over ``max_pixels`` when it opens one (reading only its header)
    and refuses those over twice that; the warning is made an error, so neither Gradio's own upload
    handling nor ours ever decodes an image over ``max_pixels``. Not done at import: it changes
    PIL's global state."""
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ProcessedSize:
    """What an image processor will make of a ``width`` x ``height`` image (see
    :func:`expected_processed_size`). Sizes are ``(width, height)``."""

    kind: str  # the branch that computed it: "resize", "anyres" or "smart_resize"
    resized: tuple  # the whole image after the processor's resize (anyres: scaled into its best grid resolution)
    output: tuple  # each view handed to the vision tower (after centre crop / tiling)
    views: int = 1  # anyres: base view + tiles; else 1

    @property
    def pixels(self) -> int:
        """The most pixels the processor holds at once: the resized image or all views, whichever
        is larger (the cost of a request, before the model)."""
        return max(self.resized[0] * self.resized[1], self.views * self.output[0] * self.output[1])


def _size_field(size, key):
    """``size[key]`` for a dict or a transformers ``SizeDict``; None when absent."""
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _resize_and_crop(ip, height: int, width: int) -> tuple:
    """``((h, w) after resize, (h, w) after centre crop)`` for the plain resize + crop pipeline of
    ``transformers``' image processors (``BaseImageProcessor`` / ``TorchvisionBackend`` /
    ``PilBackend``.resize): ``size`` is ``shortest_edge`` (+ ``longest_edge``), ``max_height`` /
    ``max_width`` or ``height`` / ``width``, checked in that order."""
    size = getattr(ip, "size", None)
    if isinstance(size, int):
        size = {"shortest_edge": size} if not getattr(ip, "default_to_square", True) else {"height": size, "width": size}
    h, w = height, width
    if getattr(ip, "do_resize", True) and size is not None:
        short, long_ = _size_field(size, "shortest_edge"), _size_field(size, "longest_edge")
        if short and long_:  # transformers.image_transforms.get_size_with_aspect_ratio
            raw = None
            lo, hi = float(min(h, w)), float(max(h, w))
            if hi / lo * short > long_:
                raw = long_ * lo / hi
                short = int(round(raw))
            if (h <= w and h == short) or (w <= h and w == short):
                pass
            elif w < h:
                h, w = (int(raw * h / w) if raw is not None else int(short * h / w)), short
            else:
                h, w = short, (int(raw * w / h) if raw is not None else int(short * w / h))
        elif short:  # get_resize_output_image_size(default_to_square=False): short side -> shortest_edge
            lo, hi = min(h, w), max(h, w)
            new_long = int(short * hi / lo)
            h, w = (new_long, short) if w <= h else (short, new_long)
        elif _size_field(size, "max_height") and _size_field(size, "max_width"):  # get_image_size_for_max_height_width
            scale = min(_size_field(size, "max_height") / h, _size_field(size, "max_width") / w)
            h, w = int(h * scale), int(w * scale)
        elif _size_field(size, "height") and _size_field(size, "width"):
            h, w = int(_size_field(size, "height")), int(_size_field(size, "width"))
    resized = (h, w)
    crop = getattr(ip, "crop_size", None)
    if getattr(ip, "do_center_crop", False) and _size_field(crop, "height") and _size_field(crop, "width"):
        return resized, (int(_size_field(crop, "height")), int(_size_field(crop, "width")))  # pads when smaller
    return resized, resized


def expected_processed_size(processor, width: int, height: int) -> Optional[ProcessedSize]:
    """The size ``processor`` (a ``transformers`` processor or its ``image_processor``) will resize
    a ``width`` x ``height`` image to, computed from its own resize settings without resizing
    anything; None for a processor kind this function does not know (the demo then relies on the
    input-size and aspect-ratio limits alone). One branch per processor kind, mirroring
    ``transformers`` 5.x (and 4.x, whose settings are the same):

    * **smart_resize** (Qwen2-VL, Qwen2.5-VL: ``merge_size`` and ``patch_size``): both sides
      rounded to multiples of ``patch_size * merge_size`` with the area kept within
      ``[min_pixels, max_pixels]`` (``size["shortest_edge"]`` / ``size["longest_edge"]``, or the
      older ``min_pixels`` / ``max_pixels`` attributes) — ``qwen2_vl``'s ``smart_resize``. One view,
      flattened into patches.
    * **anyres** (LLaVA-NeXT, LLaVA-OneVision: ``image_grid_pinpoints``): the grid resolution that
      keeps the most of the image (``select_best_resolution``), the image scaled into it
      (``get_patch_output_size``) and padded to it, cut into ``crop_size`` tiles, plus a base view
      of the whole image (a single image; OneVision's multi-image padding to a square is not used
      by the demo).
    * **resize** (CLIP-style, LLaVA-1.5, SigLIP, ...: a ``size`` dict): ``shortest_edge`` (the short
      side to that many pixels, the long side in proportion: the step that turns a 20000 x 10 image
      into 672000 x 336), ``shortest_edge`` + ``longest_edge``, ``max_height`` / ``max_width`` or a
      fixed ``height`` / ``width``, then the centre crop to ``crop_size`` when ``do_center_crop``.
    """
    ip = getattr(processor, "image_processor", None) or processor
    width, height = max(int(width), 1), max(int(height), 1)
    size = getattr(ip, "size", None)
    merge, patch = getattr(ip, "merge_size", None), getattr(ip, "patch_size", None)
    if merge and patch and getattr(ip, "temporal_patch_size", None) is not None:
        min_px = _size_field(size, "shortest_edge") or _size_field(size, "min_pixels") or getattr(ip, "min_pixels", None)
        max_px = _size_field(size, "longest_edge") or _size_field(size, "max_pixels") or getattr(ip, "max_pixels", None)
        if not (min_px and max_px):
            return None
        h, w = height, width
        if getattr(ip, "do_resize", True):
            factor = int(patch) * int(merge)
            h, w = round(height / factor) * factor, round(width / factor) * factor
            if h * w > max_px:
                beta = math.sqrt(height * width / max_px)
                h = max(factor, math.floor(height / beta / factor) * factor)
                w = max(factor, math.floor(width / beta / factor) * factor)
            elif h * w < min_px:
                beta = math.sqrt(min_px / (height * width))
                h = math.ceil(height * beta / factor) * factor
                w = math.ceil(width * beta / factor) * factor
        return ProcessedSize("smart_resize", (w, h), (w, h))
    pinpoints = getattr(ip, "image_grid_pinpoints", None)
    if pinpoints:
        best, best_eff, best_waste = None, 0, float("inf")  # select_best_resolution, pinpoints are (h, w)
        for ph, pw in pinpoints:
            scale = min(pw / width, ph / height)
            eff = min(int(width * scale) * int(height * scale), width * height)
            waste = pw * ph - eff
            if eff > best_eff or (eff == best_eff and waste < best_waste):
                best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
        bh, bw = best
        if bw / width < bh / height:  # get_patch_output_size
            rh, rw = min(math.ceil(height * bw / width), bh), bw
        else:
            rh, rw = bh, min(math.ceil(width * bh / height), bw)
        crop = getattr(ip, "crop_size", None)
        tile = _size_field(crop, "height") or _size_field(size, "height") or _size_field(size, "shortest_edge")
        if not tile:
            return None
        tile = int(tile)
        _, (oh, ow) = _resize_and_crop(ip, tile, tile)  # every view (base and tiles) is a tile-sized square
        views = 1 + math.ceil(bh / tile) * math.ceil(bw / tile)
        return ProcessedSize("anyres", (rw, rh), (ow, oh), views)
    if size is None:
        return None
    (rh, rw), (oh, ow) = _resize_and_crop(ip, height, width)
    return ProcessedSize("resize", (rw, rh), (ow, oh))


def check_image_size(width: int, height: int, processor=None, max_pixels: int = MAX_PIXELS,
                     max_aspect: float = MAX_ASPECT, max_processed_pixels: int = MAX_PROCESSED_PIXELS) -> None:
    """Refuse (:class:`DemoInputError`, a message for the page naming the limit and what was given)
    an empty image, one over ``max_pixels``, one whose long side is over ``max_aspect`` times its
    short side, and one that ``processor`` would resize past ``max_processed_pixels`` (see
    :func:`expected_processed_size`; skipped without a processor). Needs only the size, so callers
    check before decoding the image and before calling the processor."""
    w, h = int(width), int(height)
    if w < 1 or h < 1:
        raise DemoInputError(f"The image is empty ({w} × {h} pixels).")
    if w * h > max_pixels:
        raise DemoInputError(
            f"The image is too large: {w} × {h} = {w * h / 1e6:.1f} megapixels; the limit is {max_pixels / 1e6:.0f} megapixels."
        )
    aspect = max(w, h) / min(w, h)
    if aspect > max_aspect:
        shape = "wide" if w > h else "tall"
        raise DemoInputError(
            f"The image is too {shape}: {w} × {h} pixels has an aspect ratio of {aspect:.0f}:1; "
            f"the limit is {max_aspect:g}:1. Please crop it or upload a less elongated image."
        )
    if processor is None:
        return
    out = expected_processed_size(processor, w, h)
    if out is not None and out.pixels > max_processed_pixels:
        rw, rh = out.resized
        raise DemoInputError(
            f"The image would be too large once resized for this model: {w} × {h} pixels becomes "
            f"{rw} × {rh} ({out.pixels / 1e6:.1f} megapixels) in the model's image processor; the limit is "
            f"{max_processed_pixels / 1e6:.0f} megapixels. Please upload a smaller or less elongated image."
        )


def load_image(obj, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS, processor=None,
               max_aspect: float = MAX_ASPECT, max_processed_pixels: int = MAX_PROCESSED_PIXELS) -> Image.Image:
    """A checked RGB ``PIL.Image`` from a path, bytes, PIL image or HxWxC uint8 array.

    Raises :class:`DemoInputError` (with a message meant for the page) for a missing image, a file
    over ``max_bytes``, anything PIL cannot decode and the sizes :func:`check_image_size` refuses
    (``processor``: the model's, for the size after its resize). Files are checked from their
    header, before their pixels are decoded; only the first frame of an animation is read.
    """
    if obj is None or (isinstance(obj, str) and not obj.strip()):
        raise DemoInputError("Please upload an image or pick one of the examples.")
    if isinstance(obj, InvalidUpload):
        if obj.message:
            raise DemoInputError(obj.message)
        raise DemoInputError(f"That file is not an image this demo can read ({obj.reason}). Please upload a PNG, JPEG, WebP or GIF.")
    limits = dict(processor=processor, max_pixels=max_pixels, max_aspect=max_aspect,
                  max_processed_pixels=max_processed_pixels)
    if isinstance(obj, np.ndarray):
        if obj.ndim not in (2, 3):
            raise DemoInputError(f"Expected an image array of shape HxW or HxWxC, got shape {obj.shape}.")
        check_image_size(obj.shape[1], obj.shape[0], **limits)
        obj = Image.fromarray(obj.astype(np.uint8))
    if isinstance(obj, Image.Image):
        check_image_size(obj.width, obj.height, **limits)
        return obj.convert("RGB")
    if isinstance(obj, (bytes, bytearray)):
        if len(obj) > max_bytes:
            raise DemoInputError(_too_big_bytes(len(obj), max_bytes))
        import io

        source = io.BytesIO(obj)
        name = "the upload"
    else:
        path = Path(obj)
        if not path.is_file():
            raise DemoInputError(f"Image file not found: {path.name}")
        size = path.stat().st_size
        if size > max_bytes:
            raise DemoInputError(_too_big_bytes(size, max_bytes))
        source = path
        name = path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)  # reads the header only
            check_image_size(img.width, img.height, **limits)
            img.load()  # the first frame
    except DemoInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DemoInputError(_bomb_message(exc, max_pixels)) from None
    except Exception as exc:  # UnidentifiedImageError, truncated files, ...
        raise DemoInputError(
            f"{name} is not an image this demo can read ({type(exc).__name__}). Please upload a PNG, JPEG, WebP or GIF."
        ) from None
    return img.convert("RGB")


def _bomb_message(exc: Exception, max_pixels: int) -> str:
    """The page's message for PIL's decompression-bomb refusal (the pixel count from PIL's text)."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(exc))
    given = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "over the limit"
    return f"The image is too large: {given}; the limit is {max_pixels / 1e6:.0f} megapixels."


def _too_big_bytes(size: int, limit: int) -> str:
    return f"The file is too large: {size / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB."


# ----------------------------------------------------------------------------- model loading
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


def build_prompt(processor, question: str) -> str:
    """The prompt for one image and ``question``: the processor's chat template when it has one
    (released checkpoints), else ``vtoken.zoo.build_prompt`` (the shipped checkpoints' training
    prompt), else LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    zoo = importlib.import_module("vtoken.zoo")
    if hasattr(zoo, "build_prompt"):
        try:
            return zoo.build_prompt(processor, question)
        except (TypeError, ValueError):
            pass
    if "Qwen" in type(processor).__name__:
        placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    else:
        placeholder = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {placeholder}\n{question} ASSISTANT:"


# ----------------------------------------------------------------------------- answering
class _Clock:
    """A ``generate`` streamer that only records when the first new token arrives."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self._puts = 0

    def put(self, value):
        self._puts += 1
        if self._puts == 2 and self.first is None:  # put #1 is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


@dataclass
class Answer:
    """One panel: the answer and its measurements."""

    text: str
    ttft_s: float  # time to first token (prefill, vision tower included)
    total_s: float  # whole generate call
    new_tokens: int
    context_tokens: int  # tokens of the prompt (visual tokens included) entering the LLM
    visual_tokens: int  # visual tokens entering the LLM
    context_after: Optional[int] = None  # pruned: tokens left after the last stage
    visual_after: Optional[int] = None  # pruned: visual tokens left after the last stage
    stages: list = field(default_factory=list)  # pruned: [(layer, scorer, kept, of)]
    equivalent_tokens: Optional[float] = None
    method: Optional[str] = None
    keep: object = None


@dataclass
class Comparison:
    baseline: Answer
    pruned: Answer
    heatmap: np.ndarray  # HxWx3 uint8: one tile per stage
    masks: np.ndarray  # [stages, h, w] bool: kept patches per stage
    view: np.ndarray  # HxWx3 uint8: the image as the vision tower saw it (all patches)


class DemoEngine:
    """The model, its processor and the lock that serialises every use of the model."""

    def __init__(self, model, processor, device: str = "cpu", max_new_tokens: int = 16, note: str = "",
                 model_name: str = ""):
        self.model = model
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.note = note
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.lock = threading.Lock()
        self.visual_tokens_per_image = self._probe_visual_tokens()
        self.unavailable: dict = {}  # method -> why it cannot run on this model (see warm_up)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, device: Optional[str] = None, dtype=None, **kw):
        device = _pick_device(device)
        torch_dtype = dtype if not isinstance(dtype, (str, type(None))) else _pick_dtype(dtype, device)
        model, processor, note = load_model(name_or_path, device, torch_dtype)
        return cls(model, processor, device=device, note=note, model_name=name_or_path, **kw)

    # -- properties of the model
    @property
    def methods(self) -> list:
        import vtoken

        return [m for m in vtoken.available_methods() if m != "none" and m not in self.unavailable]

    @property
    def base_side(self) -> Optional[int]:
        """Side of the base-resolution token grid of anyres models (LLaVA-NeXT / OneVision), whose
        base-view tokens precede the high-resolution ones; None for other models."""
        cfg = self.model.config
        if getattr(cfg, "model_type", "") not in ("llava_next", "llava_onevision"):
            return None
        vc = cfg.vision_config
        return int(vc.image_size // vc.patch_size)

    @property
    def fixed_grid(self) -> bool:
        """True when every image gives the same number of visual tokens (LLaVA-1.5): budgets are
        then token counts; otherwise (dynamic resolution) fractions."""
        return getattr(self.model.config, "model_type", "") == "llava"

    def _probe_visual_tokens(self) -> Optional[int]:
        try:
            inputs = self._inputs(Image.new("RGB", (336, 336), (255, 255, 255)), "what is this?")
            return int((inputs["input_ids"][0] == self._image_token_id()).sum())
        except Exception:
            return None

    def _image_token_id(self):
        cfg = self.model.config
        for name in ("image_token_id", "image_token_index"):
            if getattr(cfg, name, None) is not None:
                return getattr(cfg, name)
        raise AttributeError("model config has no image token id")

    def _inputs(self, image: Image.Image, question: str):
        # every processor call passes here: refuse sizes the processor would blow up (a tiny but very
        # long image, a processor configured with huge sizes) before it resizes anything
        check_image_size(image.width, image.height, self.processor)
        prompt = build_prompt(self.processor, question)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        out = {}
        for k, v in inputs.items():
            if hasattr(v, "to"):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(dtype)
            out[k] = v
        return out

    def _generate(self, inputs, max_new_tokens: int):
        import torch

        tok = getattr(self.processor, "tokenizer", self.processor)
        clock = _Clock()
        with torch.inference_mode():
            clock.start = time.perf_counter()
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id, streamer=clock)
            if str(self.device).startswith("cuda"):
                torch.cuda.synchronize()
        end = time.perf_counter()
        new = out[0, inputs["input_ids"].shape[1]:]
        text = tok.decode(new, skip_special_tokens=True).strip()
        first = clock.first if clock.first is not None else end
        return text, first - clock.start, end - clock.start, int(new.numel())

    # -- the two panels
    def answer(self, image, question: str, method: Optional[str] = None, keep=None,
               max_new_tokens: Optional[int] = None):
        """One answer, unpruned (``method=None``) or pruned; returns ``(Answer, stats | None,
        inputs)``. Takes the lock: pruning state never outlives this call."""
        with self.lock:
            return self._answer_locked(image, question, method, keep, max_new_tokens)

    def _answer_locked(self, image, question, method, keep, max_new_tokens):
        import vtoken

        max_new_tokens = int(max_new_tokens or self.max_new_tokens)
        inputs = self._inputs(image, question)
        ids = inputs["input_ids"][0]
        context = int(inputs["attention_mask"][0].sum()) if "attention_mask" in inputs else int(ids.numel())
        try:
            visual = int((ids == self._image_token_id()).sum())
        except AttributeError:
            visual = 0
        if method is None:
            text, ttft, total, n = self._generate(inputs, max_new_tokens)
            return Answer(text, ttft, total, n, context, visual), None, inputs
        handle = vtoken.apply_pruning(self.model, method=method, keep=keep)
        try:
            text, ttft, total, n = self._generate(inputs, max_new_tokens)
            stats = handle.stats
        finally:
            handle.remove()
        ans = Answer(text, ttft, total, n, context, visual, method=method, keep=keep)
        if stats is not None and stats.stages:
            ans.visual_tokens = int(stats.visual_tokens[0])
            ans.stages = [(st.layer, st.scorer, int(st.kept[0].numel()), ans.visual_tokens) for st in stats.stages]
            ans.visual_after = ans.stages[-1][2]
            after = stats.context_tokens[0]
            ans.context_after = int(after[-1] if isinstance(after, (tuple, list)) else after)
            if getattr(stats, "equivalent_tokens", None):
                ans.equivalent_tokens = float(stats.equivalent_tokens[0])
        else:
            ans.visual_after, ans.context_after = visual, context
        return ans, stats, inputs

    def compare(self, image, question: str, method: str = DEFAULT_METHOD, keep=64,
                max_new_tokens: Optional[int] = None) -> Comparison:
        """Both panels for one request (unpruned, then pruned), under one hold of the lock."""
        image = load_image(image, processor=self.processor)
        question = (question or "").strip()
        if not question:
            raise DemoInputError("Please type a question about the image.")
        if len(question) > 1000:
            raise DemoInputError(f"The question is too long ({len(question)} characters; the limit is 1000).")
        if method not in self.methods:
            raise DemoInputError(f"Unknown method {method!r}; choose one of: {', '.join(self.methods)}.")
        keep = self._budget(keep)
        with self.lock:
            base, _, _ = self._answer_locked(image, question, None, None, max_new_tokens)
            pruned, stats, inputs = self._answer_locked(image, question, method, keep, max_new_tokens)
        view = model_view(inputs, self.processor, image)
        masks, scores, labels = kept_masks(stats, aspect=view.shape[1] / max(view.shape[0], 1),
                                           base_side=self.base_side)
        return Comparison(base, pruned, render_heatmap(view, masks, scores, labels), masks, view)

    def _budget(self, keep):
        try:
            value = float(keep)
        except (TypeError, ValueError):
            raise DemoInputError(f"The budget must be a number, got {keep!r}.") from None
        if self.fixed_grid:
            n = self.visual_tokens_per_image or 576
            if not 1 <= value <= n:
                raise DemoInputError(f"The budget must be between 1 and {n} visual tokens, got {keep}.")
            return int(round(value))
        if not 0 < value <= 100:
            raise DemoInputError(f"The budget must be a percentage in (0, 100], got {keep}.")
        return value / 100.0

    def warm_up(self, check_methods: bool = True, methods: Optional[list] = None) -> dict:
        """Answer once unpruned and once per method on a blank image (two new tokens each: prefill
        and a decode step), so the first real request's timings exclude one-off costs, and methods
        that cannot run on this model (a preset deeper than the model, a signal its vision tower
        cannot give) leave the dropdown. ``methods`` limits the check to those names. Returns
        :attr:`unavailable` (method -> reason)."""
        import vtoken

        blank = Image.new("RGB", (336, 336), (255, 255, 255))
        keep = 16 if self.fixed_grid else 0.25
        with self.lock:
            self._answer_locked(blank, "what is this?", None, None, 2)
            names = list(methods) if methods is not None else self.methods
            if not check_methods:
                names = [DEFAULT_METHOD if DEFAULT_METHOD in self.methods else self.methods[0]]
            for name in names:
                try:
                    self._answer_locked(blank, "what is this?", name, keep, 2)
                except vtoken.VTokenError as exc:
                    self.unavailable[name] = str(exc)
                except Exception as exc:  # a method bug must not take the demo down
                    self.unavailable[name] = f"{type(exc).__name__}: {exc}"
        return dict(self.unavailable)


# ----------------------------------------------------------------------------- heatmap
def model_view(inputs, processor, image: Image.Image, max_side: int = 672) -> np.ndarray:
    """HxWx3 uint8: the pixels the vision tower saw (un-normalised ``pixel_values`` for CLIP-style
    processors: resized and centre-cropped), else the image itself, at most ``max_side`` pixels on
    its longer side (it goes back to the browser)."""
    pv = inputs.get("pixel_values") if isinstance(inputs, dict) else None
    ip = getattr(processor, "image_processor", None)
    if pv is not None and pv.dim() in (4, 5) and ip is not None:
        x = pv[0] if pv.dim() == 4 else pv[0, 0]
        x = x.detach().float().cpu().numpy()  # 3, H, W
        if getattr(ip, "do_normalize", True) and getattr(ip, "image_mean", None) is not None:
            mean = np.asarray(ip.image_mean, dtype=np.float32).reshape(-1, 1, 1)
            std = np.asarray(ip.image_std, dtype=np.float32).reshape(-1, 1, 1)
            x = x * std + mean
        scale = getattr(ip, "rescale_factor", 1 / 255) if getattr(ip, "do_rescale", True) else 1.0
        x = np.clip(x / scale, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        if x.shape[2] == 3:
            return x
    image = image.convert("RGB")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    return np.asarray(image)


def _segment_grid(seg, aspect: float = 1.0, base_side: Optional[int] = None) -> tuple:
    """(t, h, w) of a segment's token grid. When the adapter gives none: the base view's
    ``base_side`` x ``base_side`` grid (its tokens come first) if the segment is longer (LLaVA-NeXT
    anyres, whose high-resolution tiles and newline tokens follow), else the h x w = length
    factorisation whose w / h is closest to the image's ``aspect`` (width / height)."""
    grid = getattr(seg, "grid", None)
    if grid is not None:
        t, h, w = (int(v) for v in grid)
        if 0 < t * h * w <= seg.length:
            return t, h, w
    if base_side and seg.length > base_side * base_side:
        return 1, int(base_side), int(base_side)
    n = max(int(seg.length), 1)
    best = (1, n)
    for h in range(1, math.isqrt(n) + 1):
        if n % h == 0:
            for hh, ww in ((h, n // h), (n // h, h)):
                if abs(math.log(ww / hh / aspect)) < abs(math.log(best[1] / best[0] / aspect)):
                    best = (hh, ww)
    return 1, best[0], best[1]


def kept_masks(stats, sample: int = 0, segment: int = 0, aspect: float = 1.0, base_side: Optional[int] = None):
    """``(masks, scores, labels)`` for one image: masks [stages, h, w] bool (patch kept after the
    stage), scores [stages, h, w] float (NaN where the scorer gave none), labels per stage.

    ``stats`` is ``handle.stats`` (kept indices are the sample's visual-token indices); ``None``
    (nothing pruned) gives empty arrays. ``aspect`` (image width / height) and ``base_side`` guide
    the grid when the adapter reports none (see :func:`_segment_grid`).
    """
    if stats is None or not stats.stages:
        return np.zeros((0, 1, 1), bool), np.zeros((0, 1, 1), np.float32), []
    seg = stats.segments[sample][segment]
    t, h, w = _segment_grid(seg, aspect, base_side)
    n = t * h * w
    masks = np.zeros((len(stats.stages), h, w), bool)
    scores = np.full((len(stats.stages), h, w), np.nan, np.float32)
    labels = []
    for i, st in enumerate(stats.stages):
        idx = st.kept[sample].cpu().numpy().astype(np.int64) - int(seg.offset)
        idx = idx[(idx >= 0) & (idx < n)]
        flat = np.zeros(n, bool)
        flat[idx] = True
        masks[i] = flat.reshape(t, h, w).any(0)
        sc = getattr(st, "scores", None)
        if sc is not None and len(sc) > sample and sc[sample] is not None:
            s = sc[sample].detach().float().cpu().numpy()[seg.offset: seg.offset + n]
            if s.size == n:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames
                    scores[i] = np.nanmax(s.reshape(t, h, w), axis=0)
        kept = int(masks[i].sum())
        where = "before the LLM" if st.layer == 0 else f"layer {st.layer}"
        labels.append(f"{where} · {st.scorer} · kept {kept}/{h * w}")
    return masks, scores, labels


# a small perceptual colormap (inferno-like anchors), so matplotlib is not needed
_CMAP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


def _colormap(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1) * (len(_CMAP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_CMAP) - 2)
    f = (x - lo)[..., None]
    return _CMAP[lo] * (1 - f) + _CMAP[lo + 1] * f


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def render_heatmap(view: np.ndarray, masks: np.ndarray, scores: np.ndarray, labels: list,
                   tile: int = 336) -> np.ndarray:
    """One tile per stage, side by side, HxWx3 uint8: pruned patches dimmed, kept patches in full
    colour (tinted by the stage's scores when it has them), a caption strip above each tile.
    Tiles are ``tile`` pixels high and as wide as the token grid's aspect ratio asks."""
    header = 22
    if len(masks) == 0:
        base = Image.fromarray(view).convert("RGB").resize((tile, tile), Image.BICUBIC)
        out = Image.new("RGB", (tile, tile + header), (255, 255, 255))
        out.paste(base, (0, header))
        ImageDraw.Draw(out).text((6, 4), "no pruning stage ran", fill=(40, 40, 40), font=_font(13))
        return np.asarray(out)
    gh, gw = masks.shape[1:]
    width = int(min(max(round(tile * gw / gh), tile // 3), 3 * tile))
    size = (width, tile)
    base = Image.fromarray(view).convert("RGB").resize(size, Image.BICUBIC)
    base_f = np.asarray(base, np.float32)
    gap = 8
    font = _font(13)
    canvas = Image.new("RGB", (len(masks) * width + (len(masks) - 1) * gap, tile + header), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (mask, score) in enumerate(zip(masks, scores, strict=True)):
        up = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        gray = base_f.mean(-1, keepdims=True)
        dim = 0.3 * gray + 0.1 * base_f + 35  # pruned: dimmed, desaturated
        kept_rgb = base_f
        ok = np.isfinite(score) & mask
        if ok.sum() >= 2:
            s = score.copy()
            lo, hi = np.nanmin(s[ok]), np.nanmax(s[ok])
            rank = np.where(ok, (s - lo) / (hi - lo + 1e-12), 0.0)
            heat = _colormap(0.25 + 0.75 * rank)  # h, w, 3
            heat_up = np.asarray(Image.fromarray(heat.astype(np.uint8)).resize(size, Image.NEAREST), np.float32)
            kept_rgb = 0.55 * base_f + 0.45 * heat_up
        else:
            kept_rgb = 0.7 * base_f + 0.3 * np.array([40, 200, 90], np.float32)  # no scores: green tint
        rgb = np.where(up[..., None], kept_rgb, dim).clip(0, 255).astype(np.uint8)
        x0 = i * (width + gap)
        canvas.paste(Image.fromarray(rgb), (x0, header))
        draw.text((x0 + 4, 4), labels[i] if i < len(labels) else f"stage {i}", fill=(30, 30, 30), font=font)
    return np.asarray(canvas)


# ----------------------------------------------------------------------------- page
def _fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def metrics_markdown(ans: Answer, baseline: Optional[Answer] = None) -> str:
    rows = [("time to first token", _fmt_s(ans.ttft_s)), ("total time", _fmt_s(ans.total_s)),
            ("new tokens", str(ans.new_tokens))]
    if ans.method is None:
        rows += [("tokens in context", str(ans.context_tokens)), ("visual tokens", str(ans.visual_tokens))]
    else:
        rows += [("tokens in context", f"{ans.context_tokens} → {ans.context_after}"),
                 ("visual tokens", f"{ans.visual_tokens} → {ans.visual_after}")]
        for layer, scorer, kept, of in ans.stages:
            rows.append((f"stage: {'before LLM' if layer == 0 else f'layer {layer}'} ({scorer})", f"{kept} / {of} kept"))
        if ans.equivalent_tokens is not None:
            rows.append(("layer-averaged visual tokens", f"{ans.equivalent_tokens:.1f}"))
        if baseline is not None and ans.ttft_s > 0:
            rows.append(("TTFT vs unpruned", f"{baseline.ttft_s / ans.ttft_s:.2f}× faster"
                         if baseline.ttft_s >= ans.ttft_s else f"{ans.ttft_s / baseline.ttft_s:.2f}× slower"))
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def handle_request(engine: DemoEngine, image, question, method, keep, max_new_tokens):
    """The page's callback: ``(status, base answer, base metrics, base view, pruned answer,
    pruned metrics, heatmap)``. Bad input and failures come back as a status message, never as a
    traceback."""
    empty = ("", "", None, "", "", None)
    try:
        cmp = engine.compare(image, question, method=method, keep=keep, max_new_tokens=max_new_tokens)
    except DemoInputError as exc:
        return (f"**⚠ {exc}**",) + empty
    except VTokenError as exc:  # e.g. a method whose preset or signals this model cannot serve
        return (f"**⚠ Method {method} cannot run on this model:** {exc}",) + empty
    except Exception as exc:  # keep the page usable; the console gets the traceback
        import traceback

        traceback.print_exc()
        return (f"**⚠ The model failed on this request:** {type(exc).__name__}: {exc}",) + empty
    b, p = cmp.baseline, cmp.pruned
    budget = f"{p.keep} tokens" if isinstance(p.keep, int) else f"{p.keep:.0%}"
    status = f"✓ Answered with **{p.method}**, budget {budget} per image."
    return (status, b.text or "(empty answer)", metrics_markdown(b), cmp.view, p.text or "(empty answer)",
            metrics_markdown(p, b), cmp.heatmap)


def example_rows() -> list:
    """``[[image path, question], ...]`` of the shipped examples."""
    listing = EXAMPLES_DIR / "examples.json"
    if not listing.is_file():
        return []
    rows = []
    for item in json.loads(listing.read_text()):
        path = EXAMPLES_DIR / item["image"]
        if path.is_file():
            rows.append([str(path), item["question"]])
    return rows


CSS = """
#status {min-height: 2em}
.vt-panel {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px}
"""


def _tolerant_preprocess(component) -> None:
    """Make a ``gr.Image``'s upload decoding errors reach our handler as :class:`InvalidUpload`
    (shown as a message in the page) instead of Gradio's bare "Error" toast. Done on the instance:
    a ``gr.Image`` subclass would make Gradio write a ``.pyi`` stub beside this file."""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return InvalidUpload(type(exc).__name__, _bomb_message(exc, MAX_PIXELS))
        except Exception as exc:
            return InvalidUpload(type(exc).__name__)

    component.preprocess = preprocess


def build_app(engine: DemoEngine):
    """The Gradio Blocks page for ``engine`` (not launched)."""
    import gradio as gr

    methods = engine.methods
    method0 = DEFAULT_METHOD if DEFAULT_METHOD in methods else (methods[0] if methods else None)
    if engine.fixed_grid:
        n = engine.visual_tokens_per_image or 576
        budget = dict(minimum=1, maximum=n, value=min(64, n), step=1,
                      label=f"Budget: visual tokens kept per image (of {n})")
    else:
        budget = dict(minimum=1, maximum=100, value=25, step=1, label="Budget: % of visual tokens kept per image")

    with gr.Blocks(title="vtoken: visual-token pruning, side by side", analytics_enabled=False) as demo:
        gr.Markdown(
            "# vtoken — visual-token pruning, side by side\n"
            f"Model **{engine.model_name}** on **{engine.device}**"
            + (f", {engine.visual_tokens_per_image} visual tokens per image" if engine.visual_tokens_per_image else "")
            + ". Left: the unpruned model. Right: the same model with `vtoken.apply_pruning(model, method, keep)`."
        )
        if engine.note:
            gr.Markdown(f"⚠ {engine.note}", elem_id="model-note")
        if engine.unavailable:
            with gr.Accordion(f"{len(engine.unavailable)} method(s) not available for this model", open=False):
                gr.Markdown("\n".join(f"- **{m}**: {why}" for m, why in sorted(engine.unavailable.items())))
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="image-input", height=300)
                _tolerant_preprocess(image)
                question = gr.Textbox(label="Question", placeholder="e.g. what shape is the red object?",
                                      elem_id="question", max_lines=2)
                with gr.Row():
                    method = gr.Dropdown(methods, value=method0, label="Pruning method", elem_id="method")
                    max_new = gr.Slider(1, 64, value=engine.max_new_tokens, step=1, label="Max new tokens",
                                        elem_id="max-new-tokens")
                keep = gr.Slider(**budget, elem_id="budget")
                ask = gr.Button("Compare", variant="primary", elem_id="ask")
                rows = example_rows()
                if rows:
                    gr.Examples(rows, inputs=[image, question], label="Examples (click one)", elem_id="examples")
            with gr.Column(scale=2):
                status = gr.Markdown("Pick an example or upload an image, then press **Compare**.", elem_id="status")
                with gr.Row(equal_height=False):
                    with gr.Column(elem_classes="vt-panel"):
                        gr.Markdown("### Unpruned")
                        base_answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer-base")
                        base_metrics = gr.Markdown(elem_id="metrics-base")
                        base_view = gr.Image(label="All patches (the image as the model sees it)", type="numpy",
                                             interactive=False, elem_id="view-base", format="png", height=360)
                    with gr.Column(elem_classes="vt-panel"):
                        gr.Markdown("### Pruned")
                        pruned_answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer-pruned")
                        pruned_metrics = gr.Markdown(elem_id="metrics-pruned")
                        heatmap = gr.Image(label="Kept patches per stage (dim = pruned)",
                                           type="numpy", interactive=False, elem_id="heatmap", format="png",
                                           height=360)

        def run(img, q, m, k, mx):
            return handle_request(engine, img, q, m, k, mx)

        outputs = [status, base_answer, base_metrics, base_view, pruned_answer, pruned_metrics, heatmap]
        ask.click(run, [image, question, method, keep, max_new], outputs, concurrency_limit=1)
        question.submit(run, [image, question, method, keep, max_new], outputs, concurrency_limit=1)
    return demo


def theme():
    """Gradio's default theme with system fonts (no web-font downloads: the page works offline)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vtoken demo", description="Side-by-side demo: unpruned vs pruned VLM answers.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name or local checkpoint folder (default {DEFAULT_MODEL}); "
                        f"{' / '.join(RANDOM_MODELS)} = random weights of the built-in shapes, for tests")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--no-method-check", action="store_true",
                   help="warm up with the default method only: skip trying every method once at start "
                        "(methods this model cannot run then stay in the list and fail with a message)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up answers at start entirely")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    harden_pil()
    engine = DemoEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                        max_new_tokens=args.max_new_tokens)
    if not args.no_warmup:
        t0 = time.perf_counter()
        skipped = engine.warm_up(check_methods=not args.no_method_check)
        print(f"[vtoken demo] warmed up in {time.perf_counter() - t0:.1f} s"
              + (f"; methods this model cannot run: {', '.join(sorted(skipped))}" if skipped else ""), flush=True)
    demo = build_app(engine)
    demo.queue(default_concurrency_limit=1)
    print(f"[vtoken demo] model={args.model} device={engine.device} http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, ssr_mode=False,
                show_error=False, theme=theme(), css=CSS, allowed_paths=[str(EXAMPLES_DIR)],
                max_file_size=UPLOAD_HARD_LIMIT, quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
