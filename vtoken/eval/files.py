"""Finding a benchmark's files under the path given on the command line (the official layouts'
folder names), and opening a question's image."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from vtoken.errors import DataError

__all__ = ["open_image", "find_file", "image_dir"]


def open_image(image):
    """A PIL RGB image from a PIL image, path, bytes dict (``datasets``) or callable (a video, a list
    of such frames: the list of RGB frames); raises
    ``OSError`` / ``ValueError`` when it cannot be read."""
    from PIL import Image

    if callable(image) and not isinstance(image, Image.Image):
        image = image()
    if isinstance(image, (list, tuple)):  # a video: its frames, each opened as an image
        if not image:
            raise ValueError("a video needs at least one frame")
        return [open_image(f) for f in image]
    if isinstance(image, dict):  # datasets Image feature, decode=False
        if image.get("bytes"):
            import io

            image = Image.open(io.BytesIO(image["bytes"]))
        elif image.get("path"):
            image = image["path"]
        else:
            raise ValueError("image record has neither bytes nor path")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image
    raise ValueError(f"expected an image, a path or bytes; got {type(image).__name__}")


def find_file(root: Path, names: list, what: str) -> Path:
    if root.is_file():
        return root
    for base in (root, root / "questions", root / "questions1.2", root / "Questions", root / "Annotations",
                 root / "data", root / "annotations"):
        for name in names:
            for hit in sorted(glob.glob(str(base / name))):
                return Path(hit)
    raise DataError(f"{what}: none of {names} found under {root}")


def image_dir(root: Path, options: dict, candidates: list, what: str) -> Path:
    if options.get("images"):
        d = Path(options["images"]).expanduser()
        if not d.is_dir():
            raise DataError(f"{what}: images={d} is not a directory")
        return d
    base = root if root.is_dir() else root.parent
    for c in candidates:
        for b in (base, base.parent):
            d = b / c
            if d.is_dir():
                return d
    raise DataError(f"{what}: no image folder found (looked for {candidates} under {base}); pass ?images=DIR")
