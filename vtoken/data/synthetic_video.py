"""Synthetic video QA where an answer needs several frames and pruning the wrong tokens loses it.

A clip is ``FRAMES`` (8) square frames of ``FRAME_SIZE`` (112) pixels. The canvas is split into a
``GRID`` x ``GRID`` (8 x 8) lattice of 14 px cells, so in the reference checkpoint
``vtoken/tiny-qwen2vl-video`` (Qwen2-VL, patch 7, 2 x 2 merge, temporal patch 2) one visual token
covers one cell of one frame PAIR: a clip is 4 x 8 x 8 = 256 visual tokens. Objects (the colours
and shapes of :mod:`vtoken.data.synthetic`, all colours in a clip distinct) are 10 px and sit in
one cell each; they change only between frame pairs (frames ``2p`` and ``2p + 1`` are identical),
because Qwen2-VL's temporal patch merges every aligned frame pair into one token.

Every clip holds 3 to 5 objects, each visible during an interval of frame pairs:

* one *flash* object, visible in exactly one frame pair,
* one or two *movers*, visible in at least 3 pairs, moving one cell (14 px) per pair in one of
  the four directions (2 or 3 cells in all: at least 0.25 of the frame),
* *static* objects visible in at least 2 consecutive pairs, in one cell.

No frame pair shows every object (counting needs the whole clip), and within a pair the visible
objects are at least 2 cells apart (one empty cell between them).

Question types (``qtype``) and their answers:

=============  ==========================================================  ====================
qtype          example                                                     answers
=============  ==========================================================  ====================
``order``      does the red object appear before the blue object?          yes/no
``motion``     which way does the red object move?                         left/right/up/down
``count_video`` how many objects appear in the video?                      3 .. 5
``flash``      what color is the object that flashes?                      a colour
=============  ==========================================================  ====================

``order`` is asked only about two objects whose first frame pairs differ (a margin of one whole
frame pair, i.e. two frames), in both orders, so "yes" and "no" are equally likely. Training-only
(:data:`AUX_QTYPES`): ``when`` ("when does the red object appear?", the digit of its first frame
pair, 0 .. 3), which supervises the temporal lookup an order question needs twice.

The canvas carries its position like :mod:`vtoken.data.synthetic` (red fades left to right, green
top to bottom) and, in the blue channel, the frame's time (255 down to 255 - ``TIME_GRADIENT``
over the clip), so every token also tells when it was seen.

Pruning matters: an object is one token of one pair (a flash object is 1 of 256 tokens), so a
random 11-25 % of the tokens misses most of what a question needs.

Determinism and disjoint splits as in :mod:`vtoken.data.synthetic`: record ``i`` of split ``s``
with seed ``k`` comes from ``numpy.random.default_rng([10 + split_code(s), k, i])`` and a clip
belongs to the split given by a hash of its canonical description (:func:`clip_split`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from vtoken.data.synthetic import COLORS, GRADIENT, SHAPES, draw_shape, question_rounds
from vtoken.data.synthetic import _canvas as synthetic_canvas

__all__ = [
    "FRAMES",
    "FRAME_SIZE",
    "GRID",
    "PAIRS",
    "DIRECTIONS",
    "QTYPES",
    "AUX_QTYPES",
    "WORDS",
    "Track",
    "Clip",
    "make_clip",
    "render_clip",
    "make_questions",
    "make_record",
    "make_split",
    "clip_split",
    "clip_key",
    "visual_tokens",
]

FRAMES = 8
PAIRS = FRAMES // 2  # Qwen2-VL's temporal patch: one token per cell per frame pair
FRAME_SIZE = 112
GRID = 8  # 14 px cells at 112 px
OBJECT_FRAC = 10 / 14  # an object's side, as a fraction of a cell
TIME_GRADIENT = 60
MIN_OBJECTS, MAX_OBJECTS = 3, 5
#: (row step, column step) per frame pair
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}

QTYPES = ("order", "motion", "count_video", "flash")
AUX_QTYPES = ("when",)
#: every word of the questions and answers (the tokenizer appends those it lacks)
WORDS: tuple[str, ...] = (
    "does", "the", "object", "appear", "before", "?", "yes", "no", "which", "way", "move", "left", "right",
    "up", "down", "how", "many", "objects", "in", "video", "what", "color", "is", "that", "flashes", "when",
) + tuple(COLORS) + tuple(str(d) for d in range(10))

_SPLIT_CODES = {"train": 1, "test": 2}
_TEST_FRACTION_MOD = 8


@dataclass(frozen=True)
class Track:
    """One object: visible in frame pairs ``start`` .. ``end`` (inclusive), in cell ``cells[k]``
    (row, column) during pair ``start + k``."""

    color: str
    shape: str
    start: int
    end: int
    cells: tuple[tuple[int, int], ...]

    @property
    def direction(self) -> str | None:
        """The direction word of a mover, None for an object that stays in one cell."""
        (r0, c0), (r1, c1) = self.cells[0], self.cells[-1]
        if (r0, c0) == (r1, c1):
            return None
        step = (int(np.sign(r1 - r0)), int(np.sign(c1 - c0)))
        return next(d for d, v in DIRECTIONS.items() if v == step)

    def cell_at(self, pair: int) -> tuple[int, int] | None:
        return self.cells[pair - self.start] if self.start <= pair <= self.end else None


@dataclass(frozen=True)
class Clip:
    tracks: tuple[Track, ...]


def clip_key(clip: Clip) -> str:
    """Canonical description of a clip (tracks sorted by colour)."""
    return "|".join(sorted(f"{t.color}:{t.shape}:{t.start}:{t.end}:{t.cells}" for t in clip.tracks))


def clip_split(clip: Clip) -> str:
    """The split a clip belongs to, from a hash of :func:`clip_key` ("train" or "test")."""
    h = int.from_bytes(hashlib.sha256(clip_key(clip).encode()).digest()[:8], "little")
    return "test" if h % _TEST_FRACTION_MOD == 0 else "train"


def _intervals(rng: np.random.Generator, n: int) -> list[tuple[int, int, str]]:
    """(start, end, role) of ``n`` objects: one flash, one or two movers, the rest static."""
    movers = 1 + int(n > 3 and rng.random() < 0.5)
    out = []
    p = int(rng.integers(PAIRS))
    out.append((p, p, "flash"))
    mover_spans = [(0, PAIRS - 1), (0, PAIRS - 2), (1, PAIRS - 1)]
    for _ in range(movers):
        s, e = mover_spans[int(rng.integers(len(mover_spans)))]
        out.append((s, e, "mover"))
    static_spans = [(s, e) for s in range(PAIRS) for e in range(s + 1, PAIRS)]
    for _ in range(n - 1 - movers):
        s, e = static_spans[int(rng.integers(len(static_spans)))]
        out.append((s, e, "static"))
    return out


def _sample_clip(rng: np.random.Generator) -> Clip | None:
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    colors = [list(COLORS)[int(i)] for i in rng.choice(len(COLORS), size=n, replace=False)]
    spans = _intervals(rng, n)
    order = rng.permutation(n)  # which colour gets which role
    occupied: list[dict[tuple[int, int], bool]] = [dict() for _ in range(PAIRS)]
    tracks = []
    for k in order:
        s, e, role = spans[int(k)]
        step = (0, 0)
        if role == "mover":
            step = list(DIRECTIONS.values())[int(rng.integers(len(DIRECTIONS)))]
        for _ in range(200):
            r0, c0 = (int(v) for v in rng.integers(1, GRID - 1, size=2))  # one free cell to the border
            cells = tuple((r0 + step[0] * j, c0 + step[1] * j) for j in range(e - s + 1))
            if not all(1 <= r <= GRID - 2 and 1 <= c <= GRID - 2 for r, c in cells):
                continue
            # one empty cell between objects visible in the same pair
            if any(max(abs(r - r2), abs(c - c2)) < 2
                   for j, (r, c) in enumerate(cells) for (r2, c2) in occupied[s + j]):
                continue
            break
        else:
            return None
        for j, cell in enumerate(cells):
            occupied[s + j][cell] = True
        tracks.append(Track(colors[len(tracks)], SHAPES[int(rng.integers(len(SHAPES)))], s, e, cells))
    if any(len(occupied[p]) == n for p in range(PAIRS)):
        return None  # some pair shows every object: counting would not need the clip
    return Clip(tuple(tracks))


def make_clip(rng: np.random.Generator, split: str = "train") -> Clip:
    """A random clip that belongs to ``split`` (rejection on :func:`clip_split`)."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    while True:
        clip = _sample_clip(rng)
        if clip is not None and clip_split(clip) == split:
            return clip


@functools.lru_cache(maxsize=16)
def _canvas(size: int, frame: int) -> Image.Image:
    """The image set's position gradient (red: x, green: y), blue fading with the frame pair."""
    canvas = np.array(synthetic_canvas(size, GRADIENT))
    canvas[..., 2] = 255 - int(round(TIME_GRADIENT * (frame // 2 + 0.5) / PAIRS))
    return Image.fromarray(canvas, "RGB")


def render_clip(clip: Clip, size: int = FRAME_SIZE) -> list[Image.Image]:
    """The ``FRAMES`` RGB frames (``size`` x ``size``) of ``clip``."""
    frames = []
    cell = size / GRID
    for f in range(FRAMES):
        img = _canvas(size, f).copy()
        draw = ImageDraw.Draw(img)
        for t in clip.tracks:
            rc = t.cell_at(f // 2)
            if rc is not None:
                r, c = rc
                draw_shape(draw, t.shape, (c + 0.5) * cell, (r + 0.5) * cell, OBJECT_FRAC * cell / 2, COLORS[t.color])
        frames.append(img)
    return frames


def visual_tokens(size: int = FRAME_SIZE, patch: int = 7, merge: int = 2, temporal: int = 2) -> int:
    """Visual tokens of one clip in a Qwen2-VL of this patch / merge / temporal patch size."""
    side = size // (patch * merge)
    return (FRAMES // temporal) * side * side


# --------------------------------------------------------------------------------------- questions
def _question(clip: Clip, qtype: str, rng: np.random.Generator) -> tuple[str, str, tuple] | None:
    tracks = list(clip.tracks)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if qtype == "order":
        pairs = [(a, b) for a in tracks for b in tracks if a is not b and a.start != b.start]
        if not pairs:
            return None
        a, b = pick(pairs)
        ans = "yes" if a.start < b.start else "no"
        return (f"does the {a.color} object appear before the {b.color} object?", ans,
                (qtype, frozenset((a.color, b.color))))
    if qtype == "motion":
        movers = [t for t in tracks if t.direction is not None]
        if not movers:
            return None
        t = pick(movers)
        return f"which way does the {t.color} object move?", t.direction, (qtype, t.color)
    if qtype == "count_video":
        return "how many objects appear in the video?", str(len(tracks)), (qtype,)
    if qtype == "flash":
        flashes = [t for t in tracks if t.start == t.end]
        if len(flashes) != 1:
            return None
        return "what color is the object that flashes?", flashes[0].color, (qtype,)
    if qtype == "when":
        t = pick(tracks)
        return f"when does the {t.color} object appear?", str(t.start), (qtype, t.color)
    raise ValueError(f"qtype must be one of {QTYPES + AUX_QTYPES}, got {qtype!r}")


def make_question(clip: Clip, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) of type ``qtype`` about ``clip``, or None if it has none."""
    qa = _question(clip, qtype, rng)
    return None if qa is None else qa[:2]


def make_questions(clip: Clip, rng: np.random.Generator, k: int,
                   qtypes: Iterable[str] = QTYPES) -> list[tuple[str, str, str]]:
    """Up to ``k`` distinct (question, answer, qtype) triples about ``clip``, types in rounds
    (as :func:`vtoken.data.synthetic.make_questions`); every fact is asked at most once."""
    return question_rounds(lambda qt: _question(clip, qt, rng), rng, k, qtypes)


def _check(split: str, qtypes) -> tuple[str, ...]:
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    qtypes = tuple(qtypes)
    bad = [t for t in qtypes if t not in QTYPES + AUX_QTYPES]
    if bad or not qtypes:
        raise ValueError(f"qtypes must be a non-empty subset of {QTYPES + AUX_QTYPES}, got {qtypes!r}")
    return qtypes


def make_record(split: str, seed: int, i: int, size: int = FRAME_SIZE, qtypes: tuple[str, ...] = QTYPES) -> dict:
    """Record ``i`` of ``make_split(split, n, seed, size, qtypes)`` (for any ``n > i``)."""
    qtypes = _check(split, qtypes)
    rng = np.random.default_rng([10 + _SPLIT_CODES[split], seed, i])
    qtype = qtypes[i % len(qtypes)]  # balanced question types
    while True:
        clip = make_clip(rng, split)
        qa = make_question(clip, qtype, rng)
        if qa is not None:
            break
    q, a = qa
    return {
        "video": render_clip(clip, size),
        "question": q,
        "answers": [a] * 10,
        "answer": a,
        "qtype": qtype,
        "id": f"synth-video-{split}-{seed}-{i}",
        "clip": clip,
    }


def make_split(split: str, n: int, seed: int = 0, size: int = FRAME_SIZE,
               qtypes: tuple[str, ...] = QTYPES) -> list[dict]:
    """``n`` video QA records of ``split``, deterministic in (split, n, seed, size).

    Each record: ``video`` (list of ``FRAMES`` PIL RGB frames, ``size`` square), ``question``,
    ``answers`` (ten copies of ``answer``), ``answer``, ``qtype`` (round-robin over ``qtypes``),
    ``id`` and ``clip`` (the :class:`Clip`). Record ``i`` does not depend on ``n``.
    """
    qtypes = _check(split, qtypes)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_record(split, seed, i, size, qtypes) for i in range(n)]
