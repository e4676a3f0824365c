"""The records of an eval's output directory, shared by the runner (which writes them) and the report
(which reads them): the file names, a budget's canonical key (:func:`keep_key` / :func:`parse_keep`),
JSONL reading with per-line checks (:func:`read_jsonl`, :func:`check_prediction`, ...), the merged and
part files of a directory, and atomic writes. A record it cannot use raises
:class:`~vtoken.errors.DataFormatError` naming the file and line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from vtoken.errors import DataFormatError
from vtoken.eval.jsonio import json_kind

__all__ = ["PRED_FILE", "TIMING_FILE", "CONFIG_FILE", "PRED_KEYS", "keep_key", "parse_keep", "read_jsonl",
           "check_prediction", "check_timing", "check_failure", "record_key", "read_predictions",
           "existing_predictions", "existing_timings", "atomic_jsonl", "atomic_text", "log_message"]


PRED_FILE, TIMING_FILE, CONFIG_FILE = "predictions.jsonl", "timings.jsonl", "run_config.json"
#: keys every prediction record has (its identity)
PRED_KEYS = ("dataset", "id", "method", "keep")


def keep_key(keep) -> str:
    """Canonical string of a budget: ``"full"`` (upper bound), ``"192"`` or ``"0.333"``; a whole
    fraction keeps its point (``1.0`` -> ``"1.0"``: every token, not the token budget ``"1"``)."""
    if keep is None:
        return "full"
    if isinstance(keep, int):
        return str(keep)
    text = f"{float(keep):.6g}"
    return text if any(c in text for c in ".en") else text + ".0"


def parse_keep(text: str):
    """``"192"`` -> 192, ``"0.333"`` -> 0.333, ``"full"`` -> None."""
    t = str(text).strip()
    if t == "full":
        return None
    try:
        return int(t)
    except ValueError:
        return float(t)


def read_jsonl(path, check: Optional[Callable] = None, skipped: Optional[list] = None) -> list:
    """Records of a JSONL file. A line that is not JSON (the half-written last line of a killed
    run, even one cut inside a UTF-8 character) is skipped (its number appended to ``skipped``);
    ``check(record, path, line_number)`` vets every decoded line and raises on one it cannot use."""
    out = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    if skipped is not None:
                        skipped.append(n)
                    continue
                if check is not None:
                    check(rec, path, n)
                out.append(rec)
    except FileNotFoundError:
        pass
    return out


def _untouched(path) -> str:
    return f"; fix or delete that line and run again (nothing in {Path(path).parent} was changed)"


def _check_object(rec, path, n, what: str = "record", required=()) -> None:
    if not isinstance(rec, dict):
        raise DataFormatError(f"{path}, line {n}: expected a JSON object (one {what} per line), got "
                              f"{json_kind(rec)}{_untouched(path)}")
    missing = [k for k in required if k not in rec]
    if missing:
        raise DataFormatError(f"{path}, line {n}: the {what} lacks {', '.join(repr(k) for k in missing)} "
                              f"(keys: {', '.join(sorted(map(str, rec))) or 'none'}){_untouched(path)}")


def check_prediction(rec, path, n) -> None:
    """Raise :class:`DataFormatError` (file, line) unless ``rec`` is a prediction record this
    runner wrote: dataset / id / method / keep, and prediction / answers / score unless it is an
    error record."""
    _check_object(rec, path, n, "prediction record", PRED_KEYS)
    ok = rec.get("error") is not None
    if not ok:
        _check_object(rec, path, n, "prediction record", PRED_KEYS + ("prediction", "answers", "score"))
    bad = [k for k in ("dataset", "method", "keep") if not isinstance(rec[k], str)]
    if isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int)):
        bad.append("id")
    if not ok and not isinstance(rec["answers"], list):
        bad.append("answers")
    if not ok and (isinstance(rec["score"], bool) or not isinstance(rec["score"], (int, float))):
        bad.append("score")
    if bad:
        got = ", ".join(f"{k}={rec[k]!r}" for k in bad)
        raise DataFormatError(f"{path}, line {n}: the prediction record has a field of the wrong type ({got}; "
                              f"expected strings for dataset/method/keep, a string or int id, a list of answers, "
                              f"a number score){_untouched(path)}")


def check_timing(rec, path, n) -> None:
    _check_object(rec, path, n, "timing record")


def check_failure(rec, path, n) -> None:
    _check_object(rec, path, n, "failure record", ("method", "keep", "error"))


def record_key(rec) -> tuple:
    return (rec["dataset"], str(rec["id"]), rec["method"], rec["keep"])


def read_predictions(path, log: bool = False) -> list:
    """Prediction records of ``path`` (see :func:`check_prediction`); a record it cannot use
    raises :class:`DataFormatError` naming the file and line, before anything is written."""
    skipped: list = []
    recs = read_jsonl(path, check_prediction, skipped)
    if skipped and log:
        log_message(f"vtoken eval: {path}: skipped {len(skipped)} line(s) that are not JSON "
                    f"(a run killed while writing): line {', '.join(map(str, skipped[:5]))}"
                    f"{', ...' if len(skipped) > 5 else ''}; "
                    "their questions are computed again")
    return recs


def existing_predictions(out: Path, log: bool = False) -> list:
    recs = read_predictions(out / PRED_FILE, log)
    for part in sorted(out.glob("predictions.part-*.jsonl")):
        recs.extend(read_predictions(part, log))
    return recs


def existing_timings(out: Path) -> list:
    times = read_jsonl(out / TIMING_FILE, check_timing)
    for part in sorted(out.glob("timings.part-*.jsonl")):
        times.extend(read_jsonl(part, check_timing))
    return times


def atomic_jsonl(path: Path, recs: list) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def log_message(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
