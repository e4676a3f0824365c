"""The kept-token accounting of an lmms-eval run: per question the handle's stats of the batch it
was answered in (visual tokens, kept after each stage, layer-averaged equivalent tokens, tokens per
image / video segment), per task their means, and the ``handle.stats.summary()`` text of every
batch. Written as JSON (:meth:`TokenAccounting.write`) and logged (:meth:`TokenAccounting.lines`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["TokenAccounting", "FILE_PREFIX", "file_name", "mean"]

FILE_PREFIX = "vtoken_token_accounting"


def file_name(method: str, keep, stamp: str) -> str:
    """``vtoken_token_accounting_<method>_<keep>_<stamp>.json`` (one file per run, as lmms-eval's
    date-stamped results files beside it)."""
    return f"{FILE_PREFIX}_{method}_{'full' if keep is None else keep}_{stamp}.json"


def mean(values) -> Optional[float]:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class TokenAccounting:
    """Collects :class:`~vtoken.eval.backend.BatchOutput` counts per (task, document)."""

    def __init__(self, header: dict, stamp: Optional[str] = None):
        import time

        self.header = dict(header)
        self.stamp = stamp or time.strftime("%Y%m%d_%H%M%S")
        self.samples: list = []
        self.summaries: list = []

    def add(self, task: str, doc_ids: list, output, summary: Optional[str]) -> dict:
        """Record one answered batch; returns the batch means (for lmms-eval's metrics log)."""
        n = len(doc_ids)
        per_stage = output.kept_per_stage or [None] * n
        layers = output.stage_layers or [None] * n
        segments = output.segment_tokens or [None] * n
        for j, doc_id in enumerate(doc_ids):
            self.samples.append({
                "task": task, "doc_id": doc_id, "visual_tokens": output.visual_tokens[j],
                "kept_tokens": output.kept_tokens[j], "equivalent_tokens": output.equivalent_tokens[j],
                "kept_per_stage": per_stage[j], "stage_layers": layers[j], "segment_tokens": segments[j]})
        if summary:
            self.summaries.append({"task": task, "doc_ids": list(doc_ids), "summary": summary})
        return {"vtoken_visual_tokens": mean(output.visual_tokens), "vtoken_kept_tokens": mean(output.kept_tokens),
                "vtoken_equivalent_tokens": mean(output.equivalent_tokens)}

    def per_task(self) -> dict:
        out: dict = {}
        for task in dict.fromkeys(s["task"] for s in self.samples):
            rows = [s for s in self.samples if s["task"] == task]
            stages = [s["kept_per_stage"] for s in rows if s["kept_per_stage"]]
            depth = min((len(s) for s in stages), default=0)
            out[task] = {
                "questions": len(rows),
                "visual_tokens": mean(s["visual_tokens"] for s in rows),
                "kept_tokens": mean(s["kept_tokens"] for s in rows),
                "equivalent_tokens": mean(s["equivalent_tokens"] for s in rows),
                "kept_per_stage": [mean(s[i] for s in stages) for i in range(depth)] if stages else None,
                "stage_layers": next((s["stage_layers"] for s in rows if s["stage_layers"]), None),
            }
        return out

    def to_dict(self) -> dict:
        return {**self.header, "tasks": self.per_task(), "samples": self.samples, "summaries": self.summaries}

    def lines(self) -> list:
        """One log line per task: mean visual / kept / equivalent tokens and kept per stage."""
        def fmt(v):
            return "n/a" if v is None else f"{v:.1f}"

        out = []
        for task, t in self.per_task().items():
            stages = t["kept_per_stage"]
            per = " -> ".join(f"L{l}:{fmt(k)}" for l, k in zip(t["stage_layers"] or [], stages or []))
            out.append(f"vtoken {self.header.get('method')} keep={self.header.get('keep')} {task}: "
                       f"{t['questions']} questions, visual {fmt(t['visual_tokens'])}, kept {fmt(t['kept_tokens'])}, "
                       f"equivalent {fmt(t['equivalent_tokens'])}" + (f", per stage {per}" if per else ""))
        return out

    def write(self, path) -> Path:
        """Write the JSON (atomically); ``path`` is a ``.json`` file, or a directory that gets
        :func:`file_name`."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / file_name(self.header.get("method"), self.header.get("keep"), self.stamp)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, default=str)
        os.replace(tmp, path)
        return path
