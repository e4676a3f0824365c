"""Loaders of the data sets read through Python rather than from a benchmark's files: vtoken's
synthetic scenes, the ``easy-vqa`` package, and a Hugging Face ``datasets`` directory (``hf:PATH``).
Each takes ``(spec, limit, seed)`` and returns an :class:`~vtoken.eval.samples.EvalDataset`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from vtoken.errors import DataError
from vtoken.eval.samples import MC_INSTRUCTION, METRICS, DataSpec, EvalDataset, Sample

__all__ = ["from_records", "load_synthetic", "load_synthetic_detail", "load_synthetic_video", "load_easy_vqa", "load_hf"]


def from_records(records, name: str, kind: str, source: str, total: Optional[int] = None) -> EvalDataset:
    ds = EvalDataset(name, kind, "exact", source, [], total_records=total or 0)
    seen = set()
    for i, r in enumerate(records):
        try:
            q, img = r["question"], (r["video"] if "video" in r else r["image"])
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


def load_synthetic(spec: DataSpec, limit, seed, detail: bool = False) -> EvalDataset:
    from vtoken.data.synthetic import DETAIL_QTYPES, QTYPES, make_split

    n = int(spec.options.get("n", limit or 200))
    split = spec.options.get("split", "test")
    records = make_split(split, n, int(spec.options.get("seed", seed)), qtypes=DETAIL_QTYPES if detail else QTYPES)
    name, kind = ("Detail", "synthetic-detail") if detail else ("Synthetic", "synthetic")
    return from_records(list(records)[: limit or None], name, kind, f"vtoken.data.synthetic:{split}")


def load_synthetic_detail(spec: DataSpec, limit, seed) -> EvalDataset:
    """Questions decided by one small off-centre object (``vtoken.data.synthetic.DETAIL_QTYPES``)."""
    return load_synthetic(spec, limit, seed, detail=True)


def load_synthetic_video(spec: DataSpec, limit, seed) -> EvalDataset:
    """vtoken's synthetic video QA (:mod:`vtoken.data.synthetic_video`): each sample's ``image`` is
    the clip, a list of 8 PIL frames; options ``n=``, ``split=``, ``seed=``."""
    from vtoken.data.synthetic_video import make_split

    n = int(spec.options.get("n", limit or 200))
    split = spec.options.get("split", "test")
    records = make_split(split, n, int(spec.options.get("seed", seed)))
    return from_records(list(records)[: limit or None], "SyntheticVideo", "synthetic-video",
                        f"vtoken.data.synthetic_video:{split}")


def load_easy_vqa(spec: DataSpec, limit, seed) -> EvalDataset:
    from vtoken.data import easy_vqa

    split = spec.options.get("split", "test")
    records = easy_vqa.load_easy_vqa(split, limit)
    return from_records(list(records)[: limit or None], "EasyVQA", "easy-vqa", f"easy-vqa:{split}")


_Q_COLS = ("question", "query", "prompt", "text")
_A_COLS = ("answers", "answer", "label", "multiple_choice_answer")
_ID_COLS = ("question_id", "id", "qid", "sample_id")
_IMG_COLS = ("image", "img", "picture")
_C_COLS = ("choices", "options")


def load_hf(spec: DataSpec, limit, seed) -> EvalDataset:
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
