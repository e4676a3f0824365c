"""Loaders of the yes/no hallucination and perception benchmarks: POPE (JSON-lines files) and MME
(per-category folders of images and ``question<TAB>Yes|No`` text files), in their official local
layouts (see :mod:`vtoken.eval.loaders`). Each takes ``(spec, limit, seed)`` and returns an
:class:`~vtoken.eval.samples.EvalDataset`."""

from __future__ import annotations

import json
from pathlib import Path

from vtoken.errors import DataError
from vtoken.eval.files import image_dir
from vtoken.eval.jsonio import json_kind, read_text
from vtoken.eval.samples import SHORT_ANSWER, DataSpec, EvalDataset, Sample, with_instruction

__all__ = ["read_json_lines", "load_pope", "load_mme"]


def read_json_lines(path: Path, ds: EvalDataset) -> list:
    """(where, record) pairs of a JSON-lines file (or of a JSON list): ``where`` = "line N" /
    "item N" for messages; a line that is not JSON is counted as malformed."""
    rows = []
    text = read_text(path, "POPE file")
    stripped = text.strip()
    if stripped.startswith("["):  # a JSON list instead of JSON lines
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            return [(f"item {i}", r) for i, r in enumerate(data)]
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            ds.note_malformed(f"{path.name} line {n}: not JSON ({exc.msg})")
    return rows


def load_pope(spec: DataSpec, limit, seed) -> EvalDataset:
    root = Path(spec.path).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise DataError(f"POPE: no .json/.jsonl files in {root}")
    elif root.is_file():
        files = [root]
    else:
        raise DataError(f"POPE: {root} does not exist")
    base = root if root.is_dir() else root.parent
    imgs = image_dir(base, spec.options, ["val2014", "images", "coco/val2014", "images/val2014"], "POPE")
    ds = EvalDataset(spec.options.get("name", "POPE"), "pope", "pope", str(root), [])
    multi = len(files) > 1
    per_file_limit = limit
    for fpath in files:
        category = fpath.stem.replace("coco_pope_", "")
        rows = read_json_lines(fpath, ds)
        ds.total_records += len(rows)
        taken = 0
        for where, r in rows:
            if per_file_limit and taken >= per_file_limit:
                break
            try:
                if not isinstance(r, dict):
                    raise TypeError(f"expected a JSON object, got {json_kind(r)}")
                qid, image, text = r["question_id"], r["image"], r["text"]
                label = str(r["label"]).strip().lower()
                if label not in ("yes", "no"):
                    raise ValueError(f"label {r['label']!r} is not yes/no")
                sid = f"{category}/{qid}" if multi else str(qid)
                ds.samples.append(Sample(sid, with_instruction(text, SHORT_ANSWER), [label], str(imgs / image),
                                         category, group=str(image)))
                taken += 1
            except (KeyError, TypeError, ValueError) as exc:
                ds.note_malformed(f"{fpath.name} {where}: {exc!r}")
    return ds


_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_mme(spec: DataSpec, limit, seed) -> EvalDataset:
    root = Path(spec.path).expanduser()
    if not root.is_dir():
        raise DataError(f"MME: {root} is not a directory")
    if (root / "MME_Benchmark_release_version").is_dir():
        root = root / "MME_Benchmark_release_version"
    ds = EvalDataset(spec.options.get("name", "MME"), "mme", "mme", str(root), [])
    cats = sorted(d for d in root.iterdir() if d.is_dir())
    if not cats:
        raise DataError(f"MME: no category folders in {root}")
    for cat in cats:
        qa_dir = next((cat / n for n in ("questions_answer_YN", "questions_answers_YN") if (cat / n).is_dir()), None)
        img_dir = cat / "images" if qa_dir is not None and (cat / "images").is_dir() else cat
        txt_dir = qa_dir or cat
        images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in _IMG_EXT}
        taken = 0
        for txt in sorted(txt_dir.glob("*.txt")):
            try:
                lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                ds.note_malformed(f"{cat.name}/{txt.name}: {exc!r}")
                continue
            image = images.get(txt.stem)
            for j, line in enumerate(lines):
                ds.total_records += 1
                if limit and taken >= limit:
                    continue
                parts = line.split("\t")
                label = parts[-1].strip().lower() if len(parts) >= 2 else ""
                if label not in ("yes", "no") or image is None:
                    why = "no image" if image is None else f"line {line!r} is not 'question<TAB>Yes|No'"
                    ds.note_malformed(f"{cat.name}/{txt.name}:{j + 1}: {why}")
                    continue
                question = parts[0].strip()
                ds.samples.append(Sample(f"{cat.name}/{txt.stem}/{j}", question, [label], str(image), cat.name,
                                         group=f"{cat.name}/{txt.stem}"))
                taken += 1
    return ds
