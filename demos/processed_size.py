"""What an image processor will make of an image, computed from its resize settings without
resizing anything (:func:`expected_processed_size`), so the demo can refuse an upload the processor
would blow up (a tiny 20000 x 10 PNG that LLaVA's short-side resize turns into 226 megapixels)
before the processor runs. Mirrors ``transformers``' resize code; keyed by the processor's own
settings (``size``, ``image_grid_pinpoints``, ``merge_size``), never by a model class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


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
