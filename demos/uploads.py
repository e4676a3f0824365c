"""Upload checks: the demo's size limits and :func:`load_image`, which turns a path, bytes, PIL
image or array into a checked RGB image, judging its size from the file header before any pixel is
decoded and refusing (:class:`DemoInputError`, a message for the page) what is too big in bytes,
in pixels, in aspect ratio, or once the model's processor resized it (:mod:`.processed_size`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .processed_size import expected_processed_size

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
