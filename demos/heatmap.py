"""The heatmap of kept patches: the image as the vision tower saw it (:func:`model_view`), each
pruning stage's kept visual-token indices mapped onto the image's token grid (:func:`kept_masks`),
and one captioned tile per stage, pruned patches dimmed (:func:`render_heatmap`).

Kept indices (``handle.stats.stages[i].kept``, visual-token indices of the sample) are mapped onto
the segment's token grid (``stats.segments[0][0].grid``, 24 x 24 for LLaVA-1.5). Without a grid
from the adapter: the base-resolution view when the model has one (``base_side``, from
``Adapter.base_view_side``), else the factorisation of the token count closest to the image's
aspect ratio.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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

