"""Synthetic multi-object VQA where keeping the right visual tokens matters.

Each scene is a plain canvas with 3 to 6 small objects. An object has a colour (all colours in a
scene are distinct, so "the red object" names exactly one object), a shape and a size. Objects sit
on a 24 x 24 lattice: at the default 336 px a small object lies inside one 14 px patch and a large
one covers 2 x 2 patches, so a random 64 of LLaVA-1.5's 576 visual tokens (11 %) misses most small
objects and about 60 % of large ones.

Question types (``qtype``) and their answers:

====================  ==================================================  ======================
qtype                 example                                             answers
====================  ==================================================  ======================
``shape``             what shape is the red object?                       circle/rectangle/triangle
``size``              what size is the red object?                        small/large
``color``             what color is the triangle?  (shape unique in scene) a colour
``exist``             is there a blue triangle?                           yes/no
``count_shape``       how many triangles are there?                       0 .. 6
``count_all``         how many objects are there?                         3 .. 6
``left``              is the red object left of the blue object?          yes/no
``above``             is the red object above the blue object?            yes/no
====================  ==================================================  ======================

Relation questions are only asked about two objects whose centres are at least ``_MIN_SEP`` (0.15
of the image, 3.6 patches) apart along the compared axis, so their answers are never ambiguous;
"yes" and "no" are equally likely (both orders of every pair are candidates).

Training-only question types (:data:`AUX_QTYPES`, never in a split made with the default
``qtypes``) ask for the coarse position of a named object: ``column`` ("what column is the red
object in?") and ``row`` ("what row is the red object in?"), answered by a digit 0-7 (eighths of
the image, left to right / top to bottom). They supervise directly what a relation question needs
twice (the position of a named object) and are used as auxiliary tasks by :mod:`vtoken.zoo.train`.

Colours and shapes are those of the ``easy-vqa`` data set, so one closed vocabulary serves both.

Determinism and disjoint splits: record ``i`` of split ``s`` with seed ``k`` is drawn from its own
generator ``numpy.random.default_rng([split_code(s), k, i])``, and every scene is assigned to a
split by a hash of its canonical description (:func:`scene_split`): the train generator rejects
scenes that hash to the test split and vice versa, so no scene can ever appear in both, whatever
the seeds.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "QTYPES",
    "AUX_QTYPES",
    "DETAIL_QTYPES",
    "CANVASES",
    "canvas_style",
    "detail_objects",
    "ANSWER_VOCAB",
    "AUX_WORDS",
    "QUESTION_WORDS",
    "Obj",
    "Scene",
    "make_scene",
    "render",
    "draw_shape",
    "make_question",
    "make_questions",
    "question_rounds",
    "make_split",
    "make_record",
    "scene_split",
    "scene_key",
]

# easy-vqa's eight colours (RGB values chosen to be far apart on a white canvas).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 0),
    "teal": (0, 150, 150),
    "brown": (130, 75, 25),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "rectangle", "triangle")
SHAPE_PLURAL = {"circle": "circles", "rectangle": "rectangles", "triangle": "triangles"}
SIZES = ("small", "large")
# Objects sit on a GRID x GRID lattice: at 336 px one cell is one 14 px LLaVA-1.5 patch (and one
# merged Qwen2-VL token of the reference checkpoint). A small object (12 px) fills the middle of one
# cell; a large one (26 px) is centred on a cell corner and covers 2 x 2 cells.
GRID = 24
SIZE_FRAC = {"small": 12 / 336, "large": 26 / 336}
_CELLS = {"small": 1, "large": 2}
BACKGROUND = (255, 255, 255)  # top-left corner of the canvas
# The canvas is faintly tinted so that every patch carries its absolute position (the tiny
# Qwen2-VL's vision tower has only relative, rotary positions): green fades top to bottom from 255
# to 255 - GRADIENT; red fades left to right (see CANVAS below for how).
GRADIENT = 80
# The canvas style. "bands" (the default): the red channel steps down in POS_BINS vertical bands
# of equal width (255, 255 - BAND_STEP, ...), so every background pixel names its column bin
# outright; the green ramp stays. "gradient": the red channel is a smooth ramp too (the first
# checkpoints' canvas: a ramp of GRADIENT levels moves only ~3 levels per patch, which they never
# learned to read -- their "left of" answers sat at chance, while "above" was read from the
# language model's positions). The environment variable VTOKEN_SYNTH_CANVAS overrides the default
# (training runs pass ``--canvas`` through it, so data workers in any start method render alike).
CANVASES = ("gradient", "bands")
CANVAS = "bands"
BAND_STEP = 17
MIN_OBJECTS, MAX_OBJECTS = 3, 6

QTYPES = ("shape", "size", "color", "exist", "count_shape", "count_all", "left", "above")
# evaluation-only "detail" types: the questions of shape / color / exist, asked only about a SMALL
# object (one patch) whose centre lies off-centre (Chebyshev distance >= DETAIL_OFF_CENTRE from the
# image centre, the outer ring): the regime where which tokens a method keeps matters most
DETAIL_QTYPES = ("detail_shape", "detail_color", "detail_exist")
DETAIL_OFF_CENTRE = 0.3
AUX_QTYPES = ("column", "row")  # training-only: position of a named object, digit 0 .. POS_BINS-1
POS_BINS = 8
DIGITS = tuple(str(d) for d in range(10))
ANSWER_VOCAB: tuple[str, ...] = ("yes", "no") + tuple(COLORS) + SHAPES + SIZES + DIGITS
QUESTION_WORDS: tuple[str, ...] = (
    "what", "shape", "size", "color", "is", "the", "object", "objects", "there", "a", "how", "many",
    "are", "left", "of", "above", "?",
) + tuple(SHAPE_PLURAL.values())
# words of the training-only AUX_QTYPES ("in" is also an easy-vqa word); kept apart from
# QUESTION_WORDS so the tokenizer's earlier ids do not move
AUX_WORDS: tuple[str, ...] = ("column", "row", "in")

_SPLIT_CODES = {"train": 1, "test": 2}
_TEST_FRACTION_MOD = 8  # one scene hash in 8 belongs to the test split


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    x: float  # centre, as a fraction of the image width (0 = left)
    y: float  # centre, as a fraction of the image height (0 = top)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]


def scene_key(scene: Scene) -> str:
    """Canonical description of a scene (objects sorted by colour, positions to 1e-4)."""
    parts = sorted(f"{o.color}:{o.shape}:{o.size}:{o.x:.4f}:{o.y:.4f}" for o in scene.objects)
    return "|".join(parts)


def scene_split(scene: Scene) -> str:
    """The split a scene belongs to, from a hash of :func:`scene_key` ("train" or "test")."""
    h = int.from_bytes(hashlib.sha256(scene_key(scene).encode()).digest()[:8], "little")
    return "test" if h % _TEST_FRACTION_MOD == 0 else "train"


def _sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    colors = rng.choice(len(COLORS), size=n, replace=False)
    color_names = list(COLORS)
    placed: list[Obj] = []
    taken = np.zeros((GRID, GRID), dtype=bool)  # cells covered by an object or next to one
    for ci in colors:
        size = SIZES[int(rng.integers(len(SIZES)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        c = _CELLS[size]
        for _ in range(500):
            # top-left cell of the object's c x c block, one free cell of margin to the border
            i, j = (int(v) for v in rng.integers(1, GRID - c, size=2))
            if not taken[i : i + c, j : j + c].any():
                break
        else:  # pragma: no cover - 6 objects of <= 2 x 2 cells always fit on 24 x 24
            raise RuntimeError("could not place objects")
        taken[i - 1 : i + c + 1, j - 1 : j + c + 1] = True  # keep a one-cell gap between objects
        x, y = (j + c / 2) / GRID, (i + c / 2) / GRID
        placed.append(Obj(color_names[int(ci)], shape, size, round(x, 4), round(y, 4)))
    return Scene(tuple(placed))


def make_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """A random scene that belongs to ``split`` (rejection on :func:`scene_split`)."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    while True:
        scene = _sample_scene(rng)
        if scene_split(scene) == split:
            return scene


def canvas_style(canvas: str | None = None) -> str:
    """The canvas style in force: ``canvas``, else ``$VTOKEN_SYNTH_CANVAS``, else :data:`CANVAS`."""
    style = canvas or os.environ.get("VTOKEN_SYNTH_CANVAS") or CANVAS
    if style not in CANVASES:
        raise ValueError(f"canvas must be one of {CANVASES}, got {style!r}")
    return style


@functools.lru_cache(maxsize=8)
def _canvas(image_size: int, gradient: int, style: str = "gradient") -> Image.Image:
    ramp = np.round(gradient * (np.arange(image_size) + 0.5) / image_size).astype(np.int16)
    canvas = np.empty((image_size, image_size, 3), dtype=np.uint8)
    if style == "bands":
        band = np.minimum(POS_BINS - 1, (np.arange(image_size) * POS_BINS) // image_size)
        canvas[..., 0] = (255 - BAND_STEP * band)[None, :]
    else:
        canvas[..., 0] = 255 - ramp[None, :]
    canvas[..., 1] = 255 - ramp[:, None]
    canvas[..., 2] = 255
    return Image.fromarray(canvas, "RGB")


def render(scene: Scene, image_size: int = 336, canvas: str | None = None) -> Image.Image:
    """Draw ``scene`` on an ``image_size`` x ``image_size`` RGB canvas (faint white-to-lavender
    background; ``canvas``: see :data:`CANVASES`, default :func:`canvas_style`)."""
    img = _canvas(image_size, GRADIENT, canvas_style(canvas)).copy()
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        side = SIZE_FRAC[o.size] * image_size
        draw_shape(draw, o.shape, o.x * image_size, o.y * image_size, side / 2, COLORS[o.color])
    return img


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, h: float, fill) -> None:
    """Draw one object of half-side ``h`` pixels centred at (``cx``, ``cy``)."""
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "rectangle":
        draw.rectangle([cx - h, cy - h * 0.8, cx + h, cy + h * 0.8], fill=fill)
    else:  # triangle, apex up
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)


# --------------------------------------------------------------------------------------- questions
_MIN_SEP = 0.15  # relation questions need centres at least this far apart (3.6 patches)


def _by_color(scene: Scene) -> dict[str, Obj]:
    return {o.color: o for o in scene.objects}


def detail_objects(scene: Scene) -> list[Obj]:
    """The scene's small objects whose centre is at least :data:`DETAIL_OFF_CENTRE` from the
    image centre along x or y."""
    return [o for o in scene.objects
            if o.size == "small" and max(abs(o.x - 0.5), abs(o.y - 0.5)) >= DETAIL_OFF_CENTRE]


def _detail_question(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str, tuple] | None:
    """A shape / color / exist question whose answer is decided by one small off-centre object."""
    objs = list(scene.objects)
    targets = detail_objects(scene)
    if qtype == "detail_color":  # named by its shape, which must be unique in the scene
        targets = [o for o in targets if sum(p.shape == o.shape for p in objs) == 1]
    if not targets:
        return None
    o = targets[int(rng.integers(len(targets)))]
    if qtype == "detail_shape":
        return f"what shape is the {o.color} object?", o.shape, (qtype, o.color)
    if qtype == "detail_color":
        return f"what color is the {o.shape}?", o.color, (qtype, o.shape)
    # exist: yes = the object itself; no = its colour with a shape no object of that colour has
    if rng.random() < 0.5:
        return f"is there a {o.color} {o.shape}?", "yes", (qtype, o.color, o.shape)
    s = [x for x in SHAPES if x != o.shape][int(rng.integers(len(SHAPES) - 1))]
    return f"is there a {o.color} {s}?", "no", (qtype, o.color, s)


def _question(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str, tuple] | None:
    """(question, answer, fact) of type ``qtype`` or None; ``fact`` identifies what is asked
    (a relation pair in either order is one fact)."""
    if qtype in DETAIL_QTYPES:
        return _detail_question(scene, qtype, rng)
    objs = list(scene.objects)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if qtype == "shape":
        o = pick(objs)
        return f"what shape is the {o.color} object?", o.shape, (qtype, o.color)
    if qtype == "size":
        o = pick(objs)
        return f"what size is the {o.color} object?", o.size, (qtype, o.color)
    if qtype == "color":
        counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
        unique = [o for o in objs if counts[o.shape] == 1]
        if not unique:
            return None
        o = pick(unique)
        return f"what color is the {o.shape}?", o.color, (qtype, o.shape)
    if qtype == "exist":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            c, s = pick(sorted(present))
            return f"is there a {c} {s}?", "yes", (qtype, c, s)
        # negatives: mostly near misses (the colour is there with another shape)
        scene_colors = [o.color for o in objs]
        if rng.random() < 0.7:
            c = pick(scene_colors)
        else:
            c = pick(list(COLORS))
        shapes = [s for s in SHAPES if (c, s) not in present]
        s = pick(shapes)
        return f"is there a {c} {s}?", "no", (qtype, c, s)
    if qtype == "count_shape":
        s = pick(SHAPES)
        return f"how many {SHAPE_PLURAL[s]} are there?", str(sum(o.shape == s for o in objs)), (qtype, s)
    if qtype == "count_all":
        return "how many objects are there?", str(len(objs)), (qtype,)
    if qtype in ("left", "above"):
        axis = "x" if qtype == "left" else "y"
        pairs = [
            (a, b)
            for a in objs
            for b in objs
            if a is not b and abs(getattr(a, axis) - getattr(b, axis)) >= _MIN_SEP
        ]
        if not pairs:
            return None
        a, b = pick(pairs)
        ans = "yes" if getattr(a, axis) < getattr(b, axis) else "no"
        rel = "left of" if qtype == "left" else "above"
        return f"is the {a.color} object {rel} the {b.color} object?", ans, (qtype, frozenset((a.color, b.color)))
    if qtype in AUX_QTYPES:
        o = pick(objs)
        v = o.x if qtype == "column" else o.y
        return f"what {qtype} is the {o.color} object in?", str(min(POS_BINS - 1, int(v * POS_BINS))), (qtype, o.color)
    raise ValueError(f"qtype must be one of {QTYPES + AUX_QTYPES + DETAIL_QTYPES}, got {qtype!r}")


def make_question(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) of type ``qtype`` about ``scene``, or None if the scene has none.

    ``qtype``: one of :data:`QTYPES` or the training-only :data:`AUX_QTYPES`.
    """
    qa = _question(scene, qtype, rng)
    return None if qa is None else qa[:2]


def make_questions(
    scene: Scene, rng: np.random.Generator, k: int, qtypes: Iterable[str] = QTYPES
) -> list[tuple[str, str, str]]:
    """Up to ``k`` distinct (question, answer, qtype) triples about ``scene``.

    Question types come in rounds (each round a fresh permutation of ``qtypes``), so every type
    appears once before any appears twice; a type listed twice in ``qtypes`` is asked twice as
    often. Every fact is asked at most once: in particular a relation pair is never asked in both
    orders (in a multi-turn training sequence the second answer would follow from the first).
    """
    return question_rounds(lambda qt: _question(scene, qt, rng), rng, k, qtypes)


def question_rounds(ask, rng: np.random.Generator, k: int, qtypes: Iterable[str]) -> list[tuple[str, str, str]]:
    """Up to ``k`` (question, answer, qtype) triples from ``ask(qtype) -> (question, answer, fact) | None``:
    rounds of fresh permutations of ``qtypes``, every ``fact`` at most once (see :func:`make_questions`)."""
    qtypes = list(qtypes)
    out: list[tuple[str, str, str]] = []
    seen: set = set()
    for _ in range(3 * k):
        for qt in rng.permutation(qtypes):
            if len(out) >= k:
                return out
            qa = ask(str(qt))
            if qa is not None and qa[2] not in seen:
                seen.add(qa[2])
                out.append((qa[0], qa[1], str(qt)))
    return out


def make_record(split: str, seed: int, i: int, image_size: int = 336, qtypes: tuple[str, ...] = QTYPES) -> dict:
    """Record ``i`` of ``make_split(split, n, seed, image_size, qtypes)`` (for any ``n > i``)."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    rng = np.random.default_rng([_SPLIT_CODES[split], seed, i])
    qtype = qtypes[i % len(qtypes)]  # balanced question types
    while True:
        scene = make_scene(rng, split)
        qa = make_question(scene, qtype, rng)
        if qa is not None:
            break
    q, a = qa
    return {
        "image": render(scene, image_size),
        "question": q,
        "answers": [a] * 10,
        "answer": a,
        "qtype": qtype,
        "id": f"synth-{split}-{seed}-{i}",
        "scene": scene,
    }


def make_split(
    split: str, n: int, seed: int = 0, image_size: int = 336, qtypes: tuple[str, ...] = QTYPES
) -> list[dict]:
    """``n`` VQA records of ``split`` ("train" or "test"), deterministic in (split, n, seed, image_size).

    Each record: ``image`` (PIL RGB, ``image_size`` square), ``question`` (str), ``answers`` (ten
    copies of the canonical answer, VQAv2-style), ``answer`` (str), ``qtype`` (str, see
    :data:`QTYPES`; types are balanced round-robin), ``id`` (str) and ``scene`` (the :class:`Scene`).
    Record ``i`` does not depend on ``n``: ``make_split(s, 10)`` is a prefix of ``make_split(s, 20)``.
    ``qtypes``: the question types, in round-robin order (default :data:`QTYPES`; the training-only
    :data:`AUX_QTYPES` may be added for diagnostics).
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    qtypes = tuple(qtypes)
    bad = [t for t in qtypes if t not in QTYPES + AUX_QTYPES + DETAIL_QTYPES]
    if bad or not qtypes:
        raise ValueError(f"qtypes must be a non-empty subset of {QTYPES + AUX_QTYPES + DETAIL_QTYPES}, "
                         f"got {qtypes!r}")
    return [make_record(split, seed, i, image_size, qtypes) for i in range(n)]
