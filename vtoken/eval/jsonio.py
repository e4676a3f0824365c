"""Reading a benchmark's text and JSON files with errors that name the file and the line
(:class:`~vtoken.errors.DataFormatError`): not UTF-8, empty, not JSON, or not of the expected shape.
:func:`json_kind` describes a parsed value for such messages (the runner's record checks use it too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from vtoken.errors import DataError, DataFormatError

__all__ = ["read_text", "line_at", "json_kind", "read_json"]


def read_text(path: Path, what: str = "") -> str:
    """A text file's contents; a clear :class:`DataFormatError` (file, line, byte) if it is not UTF-8."""
    label = f"{what} {path}" if what else str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {label}: {exc}") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(f"{label}, line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                              f"{exc.start}); save the file as UTF-8") from None


def line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def json_kind(x) -> str:
    """What a parsed JSON value is, for error messages ("a JSON list (3 items)", ...)."""
    if isinstance(x, list):
        return f"a JSON list ({len(x)} item{'s' if len(x) != 1 else ''})"
    if isinstance(x, dict):
        return f"a JSON object with keys {', '.join(repr(k) for k in list(x)[:6])}{', ...' if len(x) > 6 else ''}" \
            if x else "an empty JSON object"
    if isinstance(x, str):
        return "a JSON string"
    if isinstance(x, bool):
        return "a JSON boolean"
    if isinstance(x, (int, float)):
        return "a JSON number"
    return "null" if x is None else type(x).__name__


def read_json(path: Path, what: str = "", shape=None, key: Optional[str] = None, expected: str = ""):
    """A JSON file, with a :class:`DataFormatError` naming the file and line when it is empty, not
    UTF-8, not JSON, or not of the expected shape: ``shape`` = ``dict`` / ``list`` / a tuple of
    them (the top-level value); ``key`` = the top-level object's list to return (e.g. VQAv2's
    ``"questions"``); ``expected`` describes the layout in the message."""
    label = f"{what} {path}" if what else str(path)
    text = read_text(path, what)
    if not text.strip():
        raise DataFormatError(f"{label}, line 1: the file is empty; expected {expected or 'JSON'}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{label}, line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})") from None
    top = line_at(text, len(text) - len(text.lstrip()))
    want = expected or (f"a JSON object with a {key!r} list" if key else "")
    if key is not None:
        shape = dict
    if shape is not None and not isinstance(data, shape):
        raise DataFormatError(f"{label}, line {top}: expected {want or 'a JSON ' + _shape_name(shape)}, "
                              f"got {json_kind(data)}")
    if key is None:
        return data
    if key not in data:
        raise DataFormatError(f"{label}, line {top}: expected {want}; the top-level object has no {key!r} key "
                              f"(it is {json_kind(data)})")
    value = data[key]
    if not isinstance(value, list):
        import re

        m = re.search(r'"' + re.escape(key) + r'"\s*:', text)
        line = line_at(text, m.start()) if m else top
        raise DataFormatError(f"{label}, line {line}: {key!r} must be a JSON list, got {json_kind(value)}")
    return value


def _shape_name(shape) -> str:
    shapes = shape if isinstance(shape, tuple) else (shape,)
    return " or ".join({dict: "object", list: "list"}.get(s, s.__name__) for s in shapes)
