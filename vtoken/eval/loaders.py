"""Data sets for the eval script: the built-in ones and the official local layouts of the field's
benchmarks. Nothing is downloaded; paths point at files you already have.

A data set is named on the command line as ``KIND[:PATH][?key=value&key=value]``:

==============  =====================================================================  ===========
spec            layout read (PATH is a directory unless said otherwise)                 metric
==============  =====================================================================  ===========
``synthetic``   vtoken's synthetic multi-object scenes (``vtoken.data.synthetic``)      exact match
``easy-vqa``    the ``easy-vqa`` PyPI data set, test split (``vtoken.data.easy_vqa``)   exact match
``synthetic-video`` vtoken's synthetic video QA (``vtoken.data.synthetic_video``: 8     exact match
                frames of 112 px; order, motion, count, flash questions); default model
                ``vtoken/tiny-qwen2vl-video``, default methods :data:`VIDEO_METHODS`
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
for ``hf``), ``name=`` (column title in the table), ``seed=`` (synthetic, synthetic-video).

Questions of the official benchmarks get the instruction LLaVA's evaluation appends
("Answer the question using a single word or phrase.", or the ScienceQA / MME wording).

Records the loader cannot use (missing fields, unknown answer) are counted in
``EvalDataset.malformed`` and reported, never fatal; an image that cannot be read is found (and
counted) when the runner opens it.

This module parses specs and dispatches to the loaders of :mod:`vtoken.eval.formats_builtin`
(synthetic, easy-vqa, hf), :mod:`vtoken.eval.formats_json` (vqav2, gqa, textvqa, scienceqa) and
:mod:`vtoken.eval.formats_yesno` (pope, mme); they share :mod:`vtoken.eval.samples` (the data types),
:mod:`vtoken.eval.jsonio` (JSON with file-and-line errors) and :mod:`vtoken.eval.files` (finding files,
opening images). Every name of ``__all__`` stays importable from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import parse_qsl

from vtoken.errors import DataError, DataFormatError
from vtoken.eval.files import open_image
from vtoken.eval.formats_builtin import (load_easy_vqa, load_hf, load_synthetic, load_synthetic_detail,
                                        load_synthetic_video)
from vtoken.eval.formats_json import load_gqa, load_scienceqa, load_textvqa, load_vqav2
from vtoken.eval.formats_yesno import load_mme, load_pope
from vtoken.eval.samples import SHORT_ANSWER, DataSpec, EvalDataset, Sample

# importable from here as before they moved to vtoken.eval.jsonio / samples
from vtoken.eval.jsonio import json_kind  # noqa: F401
from vtoken.eval.samples import MC_INSTRUCTION, METRICS  # noqa: F401

__all__ = [
    "Sample",
    "EvalDataset",
    "DataSpec",
    "parse_data_spec",
    "split_data_args",
    "load_dataset",
    "open_image",
    "KINDS",
    "BUILTIN_KINDS",
    "VIDEO_KINDS",
    "SHORT_ANSWER",
    "DataError",
    "DataFormatError",
]


KINDS = ("synthetic", "synthetic-detail", "synthetic-video", "easy-vqa", "vqav2", "gqa", "textvqa", "pope", "scienceqa",
         "mme", "hf")
_ALIASES = {"synthetic_video": "synthetic-video", "video": "synthetic-video", "synthetic_detail": "synthetic-detail",
            "detail": "synthetic-detail",
            "easyvqa": "easy-vqa", "easy_vqa": "easy-vqa", "vqa2": "vqav2", "vqav2": "vqav2", "sqa": "scienceqa",
            "scienceqa-img": "scienceqa", "datasets": "hf"}


#: data sets generated or installed in Python (no PATH)
BUILTIN_KINDS = ("synthetic", "synthetic-detail", "synthetic-video", "easy-vqa")
#: data sets whose questions are about videos (a sample's ``image`` is a list of frames)
VIDEO_KINDS = ("synthetic-video",)
_DEFAULT_NAMES = {"synthetic": "Synthetic", "synthetic-detail": "Detail", "synthetic-video": "SyntheticVideo",
                  "easy-vqa": "EasyVQA", "vqav2": "VQAv2", "gqa": "GQA",
                  "textvqa": "TextVQA", "pope": "POPE", "scienceqa": "SQA-IMG", "mme": "MME"}


# DataError: a data set cannot be read at all (missing file, unknown layout); DataFormatError (a
# DataError): a file is not in the expected format; its message names the file and the line.


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
        if k not in BUILTIN_KINDS:
            raise DataError(f"data set {raw!r} needs a path: {k}:PATH")
        return DataSpec(k, None, options, raw)
    if os.path.isdir(body):
        return DataSpec("hf", body, options, raw)
    raise DataError(
        f"unknown data set {raw!r}: expected one of synthetic, synthetic-detail, synthetic-video, easy-vqa, vqav2:PATH, "
        "gqa:PATH, textvqa:PATH, "
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


_LOADERS: dict = {
    "synthetic": load_synthetic,
    "synthetic-detail": load_synthetic_detail,
    "synthetic-video": load_synthetic_video,
    "easy-vqa": load_easy_vqa,
    "vqav2": load_vqav2,
    "gqa": load_gqa,
    "textvqa": load_textvqa,
    "pope": load_pope,
    "scienceqa": load_scienceqa,
    "mme": load_mme,
    "hf": load_hf,
}


def load_dataset(spec, limit: Optional[int] = None, seed: int = 0) -> EvalDataset:
    """Read one data set (``spec``: a string or :class:`DataSpec`); ``limit`` = first N questions
    (per POPE file / per MME category)."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if spec.path is not None and spec.kind not in BUILTIN_KINDS:
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
