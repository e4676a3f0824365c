"""Data sets for the eval script: the built-in ones and the official local layouts of the field's
benchmarks. Nothing is downloaded; paths point at files you already have.

A data set is named on the command line as ``KIND[:PATH][?key=value&key=value]``:

==============  =====================================================================  ===========
spec            layout read (PATH is a directory unless said otherwise)                 metric
==============  =====================================================================  ===========
``synthetic``   vtoken's synthetic multi-object scenes (``vtoken.data.synthetic``)      exact match
``easy-vqa``    the ``easy-vqa`` PyPI data set, test split (``vtoken.data.easy_vqa``)   exact match
``vqav2:PATH``  ``v2_OpenEnded_mscoco_<split>_questions.json`` +                        VQA acc.
                ``v2_mscoco_<split>_annotations.json``; images ``<split>/COCO_<split>_
                <image_id:012d>.jpg`` (split default ``val2014``)
``gqa:PATH``    ``<split>_balanced_questions.json`` (PATH may be the file) + ``images/     exact match
                <imageId>.jpg`` (split default ``testdev``)
``textvqa:PATH`` ``TextVQA_0.5.1_<split>.json`` + ``train_images/<image_id>.jpg``        VQA acc.
``pope:PATH``   POPE jsonl file(s) (``question_id``, ``image``, ``text``, ``label``); a     POPE F1
                directory is read whole (``coco_pope_{random,popular,adversarial}``);
                images = COCO val2014 (``?images=DIR``)
``scienceqa:PATH`` ``problems.json`` (+ ``pid_splits.json``) and ``images/<split>/<pid>/  MC acc.
                image.png``; only problems with an image (ScienceQA-IMG), split ``test``
``mme:PATH``    MME's per-category folders: images + ``<image>.txt`` side by side, or      MME score
                ``images/`` + ``questions_answer_YN/``; lines ``question<TAB>Yes|No``
``hf:PATH``     a Hugging Face ``datasets`` directory written by ``save_to_disk`` (a bare   see below
                directory path works too); columns ``image``, ``question``, ``answers`` /
                ``answer``, optional ``choices``, ``question_id`` / ``id``
==============  =====================================================================  ===========

Options: ``split=``, ``images=DIR`` (image folder), ``metric=`` (vqa, exact, pope, mc, mme;
for ``hf``), ``name=`` (column title in the table), ``seed=`` (synthetic).

Questions of the official benchmarks get the instruction LLaVA's evaluation appends
("Answer the question using a single word or phrase.", or the ScienceQA / MME wording).

Records the loader cannot use (missing fields, unknown answer) are counted in
``EvalDataset.malformed`` and reported, never fatal; an image that cannot be read is found (and
counted) when the runner opens it.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl

from vtoken.errors import DataError, DataFormatError

__all__ = [
    "Sample",
    "EvalDataset",
    "DataSpec",
    "parse_data_spec",
    "split_data_args",
    "load_dataset",
    "open_image",
    "KINDS",
    "SHORT_ANSWER",
    "DataError",
    "DataFormatError",
]

SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."

KINDS = ("synthetic", "easy-vqa", "vqav2", "gqa", "textvqa", "pope", "scienceqa", "mme", "hf")
_ALIASES = {"easyvqa": "easy-vqa", "easy_vqa": "easy-vqa", "vqa2": "vqav2", "vqav2": "vqav2", "sqa": "scienceqa",
            "scienceqa-img": "scienceqa", "datasets": "hf"}
#: metric kinds a data set can have
METRICS = ("vqa", "exact", "pope", "mc", "mme")
_DEFAULT_NAMES = {"synthetic": "Synthetic", "easy-vqa": "EasyVQA", "vqav2": "VQAv2", "gqa": "GQA",
                  "textvqa": "TextVQA", "pope": "POPE", "scienceqa": "SQA-IMG", "mme": "MME"}


# DataError: a data set cannot be read at all (missing file, unknown layout); DataFormatError (a
# DataError): a file is not in the expected format; its message names the file and the line.


@dataclass
class Sample:
    """One question.

    id:       unique within its data set (string).
    question: the text given to the model (instruction included).
    answers:  reference answers (VQA: the ten human answers; POPE / MME: ["yes"] or ["no"];
              multiple choice: [letter]).
    image:    a PIL image, a path, or a zero-argument callable returning one of them.
    qtype:    question type / category (POPE split, MME category, GQA structural type, ...).
    choices:  the options of a multiple-choice question.
    group:    the image a question belongs to (MME's acc+).
    """

    id: str
    question: str
    answers: list
    image: Any
    qtype: str = ""
    choices: Optional[list] = None
    group: str = ""


@dataclass
class EvalDataset:
    name: str  # column title
    kind: str  # spec kind (synthetic, vqav2, ...)
    metric: str  # one of METRICS
    source: str  # where it was read from
    samples: list
    malformed: int = 0
    malformed_examples: list = field(default_factory=list)
    total_records: int = 0  # records seen before --limit

    def note_malformed(self, what: str) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < 5:
            self.malformed_examples.append(what)


@dataclass
class DataSpec:
    kind: str
    path: Optional[str]
    options: dict
    text: str


def parse_data_spec(text: str) -> DataSpec:
    """``KIND[:PATH][?k=v&...]`` → :class:`DataSpec`; a bare existing directory is ``hf:``."""
    raw = text.strip()
    body, _, query = raw.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    kind, sep, path = body.partition(":")
    k = _ALIASES.get(kind.strip().lower(), kind.strip().lower())
    if sep and k in KINDS:
        return DataSpec(k, path or None, options, raw)
    if not sep and k in KINDS:
        if k not in ("synthetic", "easy-vqa"):
            raise DataError(f"data set {raw!r} needs a path: {k}:PATH")
        return DataSpec(k, None, options, raw)
    if os.path.isdir(body):
        return DataSpec("hf", body, options, raw)
    raise DataError(
        f"unknown data set {raw!r}: expected one of synthetic, easy-vqa, vqav2:PATH, gqa:PATH, textvqa:PATH, "
        "pope:PATH, scienceqa:PATH, mme:PATH, hf:PATH or a local `datasets` directory"
    )


def split_data_args(values) -> list:
    """Flatten ``--data`` values: space-separated items, each possibly a comma list."""
    out = []
    for v in values or []:
        pieces = [p for p in str(v).split(",")]
        cur = None
        for p in pieces:
            head = p.split(":")[0].split("?")[0].strip().lower()
            starts = _ALIASES.get(head, head) in KINDS or os.path.isdir(p)
            if cur is None or starts:
                if cur is not None:
                    out.append(cur)
                cur = p
            else:  # a comma inside a path or an option value
                cur = cur + "," + p
        if cur:
            out.append(cur)
    return [o.strip() for o in out if o.strip()]


def open_image(image):
    """A PIL RGB image from a PIL image, path, bytes dict (``datasets``) or callable; raises
    ``OSError`` / ``ValueError`` when it cannot be read."""
    from PIL import Image

    if callable(image) and not isinstance(image, Image.Image):
        image = image()
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


# --- helpers ----------------------------------------------------------------------------------


def _read_text(path: Path, what: str = "") -> str:
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


def _line_at(text: str, pos: int) -> int:
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


def _read_json(path: Path, what: str = "", shape=None, key: Optional[str] = None, expected: str = ""):
    """A JSON file, with a :class:`DataFormatError` naming the file and line when it is empty, not
    UTF-8, not JSON, or not of the expected shape: ``shape`` = ``dict`` / ``list`` / a tuple of
    them (the top-level value); ``key`` = the top-level object's list to return (e.g. VQAv2's
    ``"questions"``); ``expected`` describes the layout in the message."""
    label = f"{what} {path}" if what else str(path)
    text = _read_text(path, what)
    if not text.strip():
        raise DataFormatError(f"{label}, line 1: the file is empty; expected {expected or 'JSON'}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{label}, line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})") from None
    top = _line_at(text, len(text) - len(text.lstrip()))
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
        line = _line_at(text, m.start()) if m else top
        raise DataFormatError(f"{label}, line {line}: {key!r} must be a JSON list, got {json_kind(value)}")
    return value


def _shape_name(shape) -> str:
    shapes = shape if isinstance(shape, tuple) else (shape,)
    return " or ".join({dict: "object", list: "list"}.get(s, s.__name__) for s in shapes)


def _find_file(root: Path, names: list, what: str) -> Path:
    if root.is_file():
        return root
    for base in (root, root / "questions", root / "questions1.2", root / "Questions", root / "Annotations",
                 root / "data", root / "annotations"):
        for name in names:
            for hit in sorted(glob.glob(str(base / name))):
                return Path(hit)
    raise DataError(f"{what}: none of {names} found under {root}")


def _image_dir(root: Path, options: dict, candidates: list, what: str) -> Path:
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


def _with_instruction(question: str, instruction: str) -> str:
    q = str(question).strip()
    return f"{q}\n{instruction}" if instruction else q


# --- built-in sets ----------------------------------------------------------------------------


def _from_records(records, name: str, kind: str, source: str, total: Optional[int] = None) -> EvalDataset:
    ds = EvalDataset(name, kind, "exact", source, [], total_records=total or 0)
    seen = set()
    for i, r in enumerate(records):
        try:
            q, img = r["question"], r["image"]
            answers = r.get("answers") or ([r["answer"]] if r.get("answer") is not None else [])
            if not q or not answers or img is None:
                raise KeyError("question/answers/image")
            rid = str(r.get("id", i))
            if rid in seen:
                rid = f"{rid}#{i}"
            seen.add(rid)
            ds.samples.append(Sample(rid, str(q), [str(a) for a in answers], img, str(r.get("qtype", "") or "")))
        except (KeyError, TypeError, AttributeError) as exc:
            ds.note_malformed(f"record {i}: {exc}")
    if not ds.total_records:
        ds.total_records = len(ds.samples) + ds.malformed
    return ds


def _load_synthetic(spec: DataSpec, limit, seed) -> EvalDataset:
    from vtoken.data.synthetic import make_split

    n = int(spec.options.get("n", limit or 200))
    split = spec.options.get("split", "test")
    records = make_split(split, n, int(spec.options.get("seed", seed)))
    return _from_records(list(records)[: limit or None], "Synthetic", "synthetic", f"vtoken.data.synthetic:{split}")


def _load_easy_vqa(spec: DataSpec, limit, seed) -> EvalDataset:
    from vtoken.data.easy_vqa import load_easy_vqa

    split = spec.options.get("split", "test")
    records = load_easy_vqa(split, limit)
    return _from_records(list(records)[: limit or None], "EasyVQA", "easy-vqa", f"easy-vqa:{split}")


# --- official layouts -------------------------------------------------------------------------


def _load_vqav2(spec: DataSpec, limit, seed) -> EvalDataset:
    root = Path(spec.path).expanduser()
    split = spec.options.get("split", "val2014")
    qfile = _find_file(root, [f"v2_OpenEnded_mscoco_{split}_questions.json", "v2_OpenEnded_mscoco_*_questions.json"],
                       "VQAv2 questions")
    if root.is_file():
        root = root.parent
    split = qfile.name[len("v2_OpenEnded_mscoco_"): -len("_questions.json")] or split
    afile = _find_file(root, [f"v2_mscoco_{split}_annotations.json"], "VQAv2 annotations (needed to score)")
    questions = _read_json(qfile, "VQAv2 questions file", key="questions",
                           expected='a JSON object {"questions": [...], ...} (the official '
                                    'v2_OpenEnded_mscoco_<split>_questions.json)')
    anns = {a.get("question_id"): a for a in _read_json(
        afile, "VQAv2 annotations file", key="annotations",
        expected='a JSON object {"annotations": [...], ...} (the official v2_mscoco_<split>_annotations.json)')
        if isinstance(a, dict)}
    img_split = split.split("-")[0] if "test" not in split else "test2015"
    imgs = _image_dir(root, spec.options, [img_split, f"images/{img_split}", "images", f"coco/{img_split}"], "VQAv2")
    ds = EvalDataset(spec.options.get("name", "VQAv2"), "vqav2", "vqa", str(qfile), [], total_records=len(questions))
    for i, q in enumerate(questions):
        if limit and len(ds.samples) >= limit:
            break
        try:
            if not isinstance(q, dict):
                raise TypeError(f"expected a JSON object, got {json_kind(q)}")
            qid, image_id, text = q["question_id"], int(q["image_id"]), q["question"]
            ann = anns.get(qid)
            if ann is None:
                raise KeyError(f"no annotation for question {qid}")
            answers = [a["answer"] for a in ann["answers"]]
            if not answers:
                raise KeyError("empty answers")
            path = imgs / f"COCO_{img_split}_{image_id:012d}.jpg"
            if not path.exists() and (imgs / f"{image_id:012d}.jpg").exists():
                path = imgs / f"{image_id:012d}.jpg"
            ds.samples.append(Sample(str(qid), _with_instruction(text, SHORT_ANSWER), answers, str(path),
                                     str(ann.get("answer_type", "")), group=str(image_id)))
        except (KeyError, TypeError, ValueError) as exc:
            ds.note_malformed(f"question {i}: {exc!r}")
    return ds


def _load_gqa(spec: DataSpec, limit, seed) -> EvalDataset:
    root = Path(spec.path).expanduser()
    split = spec.options.get("split", "testdev")
    qfile = _find_file(root, [f"{split}_balanced_questions.json", "*_balanced_questions.json"], "GQA questions")
    data = _read_json(qfile, "GQA questions file", (dict, list),
                      expected='a JSON object {"<question id>": {"imageId", "question", "answer", ...}} (the '
                               'official <split>_balanced_questions.json) or a JSON list of such questions')
    imgs = _image_dir(qfile.parent, spec.options, ["images", "allImages/images", "../images"], "GQA")
    items = list(data.items()) if isinstance(data, dict) else [(str(i), d) for i, d in enumerate(data)]
    ds = EvalDataset(spec.options.get("name", "GQA"), "gqa", "exact", str(qfile), [], total_records=len(items))
    for qid, q in items:
        if limit and len(ds.samples) >= limit:
            break
        try:
            if not isinstance(q, dict):
                raise TypeError(f"expected a JSON object, got {json_kind(q)}")
            image_id, text, answer = q["imageId"], q["question"], q["answer"]
            qtype = (q.get("types") or {}).get("structural", "")
            ds.samples.append(Sample(str(qid), _with_instruction(text, SHORT_ANSWER), [str(answer)],
                                     str(imgs / f"{image_id}.jpg"), qtype, group=str(image_id)))
        except (KeyError, TypeError, AttributeError) as exc:
            ds.note_malformed(f"question {qid}: {exc!r}")
    return ds


def _load_textvqa(spec: DataSpec, limit, seed) -> EvalDataset:
    root = Path(spec.path).expanduser()
    split = spec.options.get("split", "val")
    qfile = _find_file(root, [f"TextVQA_0.5.1_{split}.json", "TextVQA_*_val.json"], "TextVQA questions")
    rows = _read_json(qfile, "TextVQA questions file", key="data",
                      expected='a JSON object {"data": [...], ...} (the official TextVQA_0.5.1_<split>.json)')
    imgs = _image_dir(qfile.parent, spec.options,
                      ["train_images", "train_val_images/train_images", "images", "test_images"], "TextVQA")
    ds = EvalDataset(spec.options.get("name", "TextVQA"), "textvqa", "vqa", str(qfile), [], total_records=len(rows))
    for i, q in enumerate(rows):
        if limit and len(ds.samples) >= limit:
            break
        try:
            if not isinstance(q, dict):
                raise TypeError(f"expected a JSON object, got {json_kind(q)}")
            qid, image_id, text, answers = q["question_id"], q["image_id"], q["question"], q["answers"]
            if not answers:
                raise KeyError("no answers")
            ds.samples.append(Sample(str(qid), _with_instruction(text, SHORT_ANSWER), [str(a) for a in answers],
                                     str(imgs / f"{image_id}.jpg"), group=str(image_id)))
        except (KeyError, TypeError) as exc:
            ds.note_malformed(f"question {i}: {exc!r}")
    return ds


def _read_jsonl(path: Path, ds: EvalDataset) -> list:
    """(where, record) pairs of a JSON-lines file (or of a JSON list): ``where`` = "line N" /
    "item N" for messages; a line that is not JSON is counted as malformed."""
    rows = []
    text = _read_text(path, "POPE file")
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


def _load_pope(spec: DataSpec, limit, seed) -> EvalDataset:
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
    imgs = _image_dir(base, spec.options, ["val2014", "images", "coco/val2014", "images/val2014"], "POPE")
    ds = EvalDataset(spec.options.get("name", "POPE"), "pope", "pope", str(root), [])
    multi = len(files) > 1
    per_file_limit = limit
    for fpath in files:
        category = fpath.stem.replace("coco_pope_", "")
        rows = _read_jsonl(fpath, ds)
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
                ds.samples.append(Sample(sid, _with_instruction(text, SHORT_ANSWER), [label], str(imgs / image),
                                         category, group=str(image)))
                taken += 1
            except (KeyError, TypeError, ValueError) as exc:
                ds.note_malformed(f"{fpath.name} {where}: {exc!r}")
    return ds


def _load_scienceqa(spec: DataSpec, limit, seed) -> EvalDataset:
    root = Path(spec.path).expanduser()
    split = spec.options.get("split", "test")
    pfile = _find_file(root, ["problems.json", "scienceqa/problems.json", "data/scienceqa/problems.json"],
                       "ScienceQA problems.json")
    base = pfile.parent
    problems = _read_json(pfile, "ScienceQA problems file", dict,
                          expected='a JSON object {"<pid>": {"question", "choices", "answer", "image", ...}} '
                                   '(the official problems.json)')
    splits_file = base / "pid_splits.json"
    order = None
    if splits_file.exists():
        splits = _read_json(splits_file, "ScienceQA splits file", dict,
                            expected='a JSON object {"train": [pid, ...], "val": [...], "test": [...]} '
                                     '(the official pid_splits.json)')
        if split not in splits:
            raise DataFormatError(f"ScienceQA splits file {splits_file}: no split {split!r} "
                                  f"(splits: {', '.join(map(repr, splits)) or 'none'}); pass ?split=")
        if not isinstance(splits[split], list):
            raise DataFormatError(f"ScienceQA splits file {splits_file}: split {split!r} must be a JSON list of "
                                  f"problem ids, got {json_kind(splits[split])}")
        order = [str(p) for p in splits[split]]
    if order is None:
        order = [pid for pid, p in problems.items() if isinstance(p, dict) and p.get("split") == split]
    imgs = _image_dir(base, spec.options, ["images", "../images"], "ScienceQA")
    ds = EvalDataset(spec.options.get("name", "SQA-IMG"), "scienceqa", "mc", str(pfile), [])
    for pid in order:
        p = problems.get(pid)
        if not isinstance(p, dict):
            ds.total_records += 1
            ds.note_malformed(f"problem {pid}: missing from problems.json")
            continue
        if not p.get("image"):  # ScienceQA-IMG: only the problems with an image
            continue
        ds.total_records += 1
        if limit and len(ds.samples) >= limit:
            continue
        try:
            choices = [str(c) for c in p["choices"]]
            ans = int(p["answer"])
            if not 0 <= ans < len(choices):
                raise ValueError(f"answer {ans} outside {len(choices)} choices")
            options = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
            context = str(p.get("hint") or "").strip()
            text = (f"Context: {context}\n" if context else "") + f"{p['question']}\n{options}\n{MC_INSTRUCTION}"
            path = imgs / split / str(pid) / str(p["image"])
            ds.samples.append(Sample(str(pid), text, [chr(65 + ans)], str(path), str(p.get("subject", "")),
                                     choices=choices, group=str(pid)))
        except (KeyError, TypeError, ValueError) as exc:
            ds.note_malformed(f"problem {pid}: {exc!r}")
    return ds


_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _load_mme(spec: DataSpec, limit, seed) -> EvalDataset:
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


# --- Hugging Face `datasets` directory --------------------------------------------------------

_Q_COLS = ("question", "query", "prompt", "text")
_A_COLS = ("answers", "answer", "label", "multiple_choice_answer")
_ID_COLS = ("question_id", "id", "qid", "sample_id")
_IMG_COLS = ("image", "img", "picture")
_C_COLS = ("choices", "options")


def _load_hf(spec: DataSpec, limit, seed) -> EvalDataset:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError("reading a `datasets` directory needs the `datasets` package: pip install datasets") from exc
    root = Path(spec.path).expanduser()
    try:
        d = datasets.load_from_disk(str(root))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types
        raise DataError(f"cannot load a `datasets` directory from {root}: {exc}") from exc
    if isinstance(d, datasets.DatasetDict):
        split = spec.options.get("split") or next((s for s in ("test", "validation", "val") if s in d), list(d)[0])
        if split not in d:
            raise DataError(f"{root}: split {split!r} not in {list(d)}")
        d = d[split]
    cols = d.column_names

    def pick(cands):
        return next((c for c in cands if c in cols), None)

    qc, ac, ic, idc, cc = pick(_Q_COLS), pick(_A_COLS), pick(_IMG_COLS), pick(_ID_COLS), pick(_C_COLS)
    if qc is None or ac is None or ic is None:
        raise DataError(f"{root}: need an image, a question and an answer column; columns are {cols}")
    total = len(d)
    if limit:
        d = d.select(range(min(limit, total)))
    text_rows = d.remove_columns([ic])
    metric = spec.options.get("metric")
    name = spec.options.get("name") or root.name
    ds = EvalDataset(name, "hf", metric or "exact", str(root), [], total_records=total)
    image_col = d.cast_column(ic, datasets.Image(decode=False)) if isinstance(d.features.get(ic), datasets.Image) else d
    n_answers = []
    for i, r in enumerate(text_rows):
        try:
            q = r[qc]
            a = r[ac]
            if isinstance(a, dict):
                a = a.get("text") or a.get("answer") or list(a.values())[0]
            answers = [x.get("answer") if isinstance(x, dict) else x for x in (a if isinstance(a, list) else [a])]
            answers = [str(x) for x in answers if x is not None]
            if not q or not answers:
                raise ValueError("empty question or answers")
            choices = list(r[cc]) if cc and r.get(cc) else None
            if choices is not None and answers[0].isdigit() and int(answers[0]) < len(choices):
                answers = [chr(65 + int(answers[0]))]
            if choices is not None and not any(c.isalpha() and len(c) == 1 for c in answers):
                raise ValueError("multiple-choice answer is neither an index nor a letter")
            sid = str(r[idc]) if idc else str(i)
            text = q
            if choices is not None:
                options = "\n".join(f"{chr(65 + k)}. {c}" for k, c in enumerate(choices))
                text = f"{q}\n{options}\n{MC_INSTRUCTION}"
            ds.samples.append(Sample(sid, str(text), answers, (lambda k=i: image_col[k][ic]), str(r.get("qtype", "")),
                                     choices=choices, group=sid))
            n_answers.append(len(answers))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            ds.note_malformed(f"row {i}: {exc!r}")
    if metric is None:
        if cc:
            ds.metric = "mc"
        elif n_answers and min(n_answers) >= 3:
            ds.metric = "vqa"
    if ds.metric not in METRICS:
        raise DataError(f"metric={ds.metric!r}; expected one of {METRICS}")
    return ds


_LOADERS: dict = {
    "synthetic": _load_synthetic,
    "easy-vqa": _load_easy_vqa,
    "vqav2": _load_vqav2,
    "gqa": _load_gqa,
    "textvqa": _load_textvqa,
    "pope": _load_pope,
    "scienceqa": _load_scienceqa,
    "mme": _load_mme,
    "hf": _load_hf,
}


def load_dataset(spec, limit: Optional[int] = None, seed: int = 0) -> EvalDataset:
    """Read one data set (``spec``: a string or :class:`DataSpec`); ``limit`` = first N questions
    (per POPE file / per MME category)."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if spec.path is not None and spec.kind not in ("synthetic", "easy-vqa"):
        if not Path(spec.path).expanduser().exists():
            raise DataError(f"{spec.text}: {spec.path} does not exist")
    ds = _LOADERS[spec.kind](spec, limit, seed)
    if "name" in spec.options:
        ds.name = spec.options["name"]
    if not ds.samples:
        why = (f"{ds.malformed} malformed record(s), e.g. {'; '.join(ds.malformed_examples[:3])}"
               if ds.malformed else "it holds no questions")
        raise DataFormatError(f"{spec.text}: no usable question in {ds.source} ({ds.total_records} record(s) read; "
                              f"{why})")
    _check_images(ds, spec)
    # unique ids (a repeated id would make results ambiguous)
    seen: dict = {}
    for s in ds.samples:
        if s.id in seen:
            seen[s.id] += 1
            s.id = f"{s.id}#{seen[s.id]}"
        else:
            seen[s.id] = 0
    return ds


#: image paths probed by :func:`_check_images`
IMAGE_PROBE = 32


def _check_images(ds: EvalDataset, spec: DataSpec) -> None:
    """Stop early, with the folder to fix, when none of the first image files exists (a wrong
    image folder would otherwise give a table of failed questions); a few missing images are
    found and counted by the runner."""
    paths = [s.image for s in ds.samples[:IMAGE_PROBE] if isinstance(s.image, (str, os.PathLike))]
    if paths and not any(os.path.exists(p) for p in paths):
        folder = os.path.dirname(str(paths[0]))
        raise DataError(f"{spec.text}: none of the first {len(paths)} image files exists (e.g. {paths[0]}); "
                        f"is {folder} the image folder? pass ?images=DIR")


def loader_for(kind: str) -> Callable:
    return _LOADERS[kind]
