"""Loaders of the benchmarks published as JSON files: VQAv2, GQA, TextVQA (open-ended questions)
and ScienceQA-IMG (multiple choice), each in its official local layout (see
:mod:`vtoken.eval.loaders`). Each takes ``(spec, limit, seed)`` and returns an
:class:`~vtoken.eval.samples.EvalDataset`."""

from __future__ import annotations

from pathlib import Path

from vtoken.errors import DataFormatError
from vtoken.eval.files import find_file, image_dir
from vtoken.eval.jsonio import json_kind, read_json
from vtoken.eval.samples import MC_INSTRUCTION, SHORT_ANSWER, DataSpec, EvalDataset, Sample, with_instruction

__all__ = ["load_vqav2", "load_gqa", "load_textvqa", "load_scienceqa"]


def _take_questions(ds: EvalDataset, items, limit, sample, errors: tuple) -> EvalDataset:
    """Append ``sample(label, q)`` to ``ds`` for each ``(label, q)`` of ``items``, up to ``limit``
    questions; a ``q`` that is not a JSON object, or that ``sample`` rejects with one of ``errors``,
    is counted as malformed ("question <label>: ...")."""
    for label, q in items:
        if limit and len(ds.samples) >= limit:
            break
        try:
            if not isinstance(q, dict):
                raise TypeError(f"expected a JSON object, got {json_kind(q)}")
            ds.samples.append(sample(label, q))
        except errors as exc:
            ds.note_malformed(f"question {label}: {exc!r}")
    return ds


def load_vqav2(spec: DataSpec, limit, seed) -> EvalDataset:
    root = Path(spec.path).expanduser()
    split = spec.options.get("split", "val2014")
    qfile = find_file(root, [f"v2_OpenEnded_mscoco_{split}_questions.json", "v2_OpenEnded_mscoco_*_questions.json"],
                      "VQAv2 questions")
    if root.is_file():
        root = root.parent
    split = qfile.name[len("v2_OpenEnded_mscoco_"): -len("_questions.json")] or split
    afile = find_file(root, [f"v2_mscoco_{split}_annotations.json"], "VQAv2 annotations (needed to score)")
    questions = read_json(qfile, "VQAv2 questions file", key="questions",
                          expected='a JSON object {"questions": [...], ...} (the official '
                                   'v2_OpenEnded_mscoco_<split>_questions.json)')
    anns = {a.get("question_id"): a for a in read_json(
        afile, "VQAv2 annotations file", key="annotations",
        expected='a JSON object {"annotations": [...], ...} (the official v2_mscoco_<split>_annotations.json)')
        if isinstance(a, dict)}
    img_split = split.split("-")[0] if "test" not in split else "test2015"
    imgs = image_dir(root, spec.options, [img_split, f"images/{img_split}", "images", f"coco/{img_split}"], "VQAv2")
    ds = EvalDataset(spec.options.get("name", "VQAv2"), "vqav2", "vqa", str(qfile), [], total_records=len(questions))

    def sample(_, q):
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
        return Sample(str(qid), with_instruction(text, SHORT_ANSWER), answers, str(path),
                      str(ann.get("answer_type", "")), group=str(image_id))

    return _take_questions(ds, enumerate(questions), limit, sample, (KeyError, TypeError, ValueError))


def load_gqa(spec: DataSpec, limit, seed) -> EvalDataset:
    root = Path(spec.path).expanduser()
    split = spec.options.get("split", "testdev")
    qfile = find_file(root, [f"{split}_balanced_questions.json", "*_balanced_questions.json"], "GQA questions")
    data = read_json(qfile, "GQA questions file", (dict, list),
                     expected='a JSON object {"<question id>": {"imageId", "question", "answer", ...}} (the '
                              'official <split>_balanced_questions.json) or a JSON list of such questions')
    imgs = image_dir(qfile.parent, spec.options, ["images", "allImages/images", "../images"], "GQA")
    items = list(data.items()) if isinstance(data, dict) else [(str(i), d) for i, d in enumerate(data)]
    ds = EvalDataset(spec.options.get("name", "GQA"), "gqa", "exact", str(qfile), [], total_records=len(items))

    def sample(qid, q):
        image_id, text, answer = q["imageId"], q["question"], q["answer"]
        qtype = (q.get("types") or {}).get("structural", "")
        return Sample(str(qid), with_instruction(text, SHORT_ANSWER), [str(answer)], str(imgs / f"{image_id}.jpg"),
                      qtype, group=str(image_id))

    return _take_questions(ds, items, limit, sample, (KeyError, TypeError, AttributeError))


def load_textvqa(spec: DataSpec, limit, seed) -> EvalDataset:
    root = Path(spec.path).expanduser()
    split = spec.options.get("split", "val")
    qfile = find_file(root, [f"TextVQA_0.5.1_{split}.json", "TextVQA_*_val.json"], "TextVQA questions")
    rows = read_json(qfile, "TextVQA questions file", key="data",
                     expected='a JSON object {"data": [...], ...} (the official TextVQA_0.5.1_<split>.json)')
    imgs = image_dir(qfile.parent, spec.options,
                     ["train_images", "train_val_images/train_images", "images", "test_images"], "TextVQA")
    ds = EvalDataset(spec.options.get("name", "TextVQA"), "textvqa", "vqa", str(qfile), [], total_records=len(rows))

    def sample(_, q):
        qid, image_id, text, answers = q["question_id"], q["image_id"], q["question"], q["answers"]
        if not answers:
            raise KeyError("no answers")
        return Sample(str(qid), with_instruction(text, SHORT_ANSWER), [str(a) for a in answers],
                      str(imgs / f"{image_id}.jpg"), group=str(image_id))

    return _take_questions(ds, enumerate(rows), limit, sample, (KeyError, TypeError))


def load_scienceqa(spec: DataSpec, limit, seed) -> EvalDataset:
    root = Path(spec.path).expanduser()
    split = spec.options.get("split", "test")
    pfile = find_file(root, ["problems.json", "scienceqa/problems.json", "data/scienceqa/problems.json"],
                      "ScienceQA problems.json")
    base = pfile.parent
    problems = read_json(pfile, "ScienceQA problems file", dict,
                         expected='a JSON object {"<pid>": {"question", "choices", "answer", "image", ...}} '
                                  '(the official problems.json)')
    splits_file = base / "pid_splits.json"
    order = None
    if splits_file.exists():
        splits = read_json(splits_file, "ScienceQA splits file", dict,
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
    imgs = image_dir(base, spec.options, ["images", "../images"], "ScienceQA")
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
