"""Loader for the ``easy-vqa`` data set (PyPI package ``easy-vqa``, MIT licence).

The package ships the whole data set as files: 64 x 64 PNG images of one coloured shape (circle,
rectangle, triangle; eight colours) with 38,575 train and 9,673 test questions ("what color is the
triangle?", "does the image not contain a gray shape?", ...) whose answers come from a closed list
of 13 words (yes/no, the colours, the shapes). Nothing is downloaded: ``pip install easy-vqa``.

Records have the same keys as :func:`vtoken.data.synthetic.make_split`: ``image`` (PIL RGB),
``question``, ``answers`` (ten copies of the answer), ``answer``, ``qtype`` and ``id``.
``qtype`` is derived from the question: ``color``, ``shape`` or ``yes/no``.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

__all__ = ["load_easy_vqa", "easy_vqa_available", "easy_vqa_dir", "answer_vocab", "questions"]


def easy_vqa_available() -> bool:
    try:
        easy_vqa_dir()
    except ImportError:
        return False
    return True


def easy_vqa_dir() -> str:
    """Folder of the installed package's ``data`` directory."""
    try:
        import easy_vqa
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the easy-vqa data set needs the PyPI package: pip install easy-vqa") from err
    path = os.path.join(os.path.dirname(easy_vqa.__file__), "data")
    if not os.path.isdir(path):  # pragma: no cover
        raise ImportError(f"easy-vqa is installed but has no data folder at {path}")
    return path


def answer_vocab() -> list[str]:
    with open(os.path.join(easy_vqa_dir(), "answers.txt")) as fh:
        return [a.strip() for a in fh if a.strip()]


@lru_cache(maxsize=2)
def questions(split: str = "test") -> tuple[tuple[str, str, int], ...]:
    """All (question, answer, image_id) triples of ``split``, in the package's order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    with open(os.path.join(easy_vqa_dir(), split, "questions.json")) as fh:
        return tuple((q, a, int(i)) for q, a, i in json.load(fh))


def image_path(split: str, image_id: int) -> str:
    return os.path.join(easy_vqa_dir(), split, "images", f"{image_id}.png")


def qtype_of(question: str, answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "color" if "color" in question else "shape"


def load_easy_vqa(split: str = "test", limit: int | None = None, seed: int | None = None) -> list[dict]:
    """Records of ``split`` ("test" by default; "train" also works).

    limit: keep only this many questions: the first ones in the package's order, or, with ``seed``,
    a random subset drawn with that seed (same seed, same subset).
    """
    from PIL import Image

    qs = list(enumerate(questions(split)))
    if limit is not None and limit < len(qs):
        if seed is None:
            qs = qs[:limit]
        else:
            import numpy as np

            idx = np.random.default_rng(seed).choice(len(qs), size=limit, replace=False)
            qs = [qs[int(i)] for i in sorted(idx)]
    images: dict[int, Image.Image] = {}
    out = []
    for k, (q, a, image_id) in qs:
        if image_id not in images:
            with Image.open(image_path(split, image_id)) as im:
                images[image_id] = im.convert("RGB")
        out.append(
            {
                "image": images[image_id],
                "question": q,
                "answers": [a] * 10,
                "answer": a,
                "qtype": qtype_of(q, a),
                "id": f"easy-vqa-{split}-{k}",
                "image_id": image_id,
            }
        )
    return out
