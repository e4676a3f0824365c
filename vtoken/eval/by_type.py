"""Scores per question type (the report's ``by_type.md``): where a method's loss comes from.

A data set whose questions carry a type (``Sample.qtype``: the synthetic sets' "left" / "count" /
"flash", GQA's structural types, MME's categories, ...) gets one table: a row per method and
budget, a column per type, each cell the type's score under the data set's per-question metric
(vqa / exact / mc: mean score x 100, :func:`vtoken.eval.scores.dataset_score`) with the 95 %
interval the main table gives a data set (:func:`vtoken.eval.significance.score_interval`: Wilson
for 0/1 scores, bootstrap over the type's questions for graded VQA scores). POPE
(F1 per category is already its headline) and MME (a sum, not a mean) are left to the main table.
"""

from __future__ import annotations

from typing import Optional

from vtoken.eval.scores import dataset_score
from vtoken.eval.significance import score_interval

__all__ = ["type_scores", "render_by_type"]

#: metrics whose per-question scores average into the type's score
MEAN_METRICS = ("vqa", "exact", "mc")


def type_scores(metric: str, recs: list) -> Optional[dict]:
    """qtype -> {"score": 0-100, "n": questions, "low"/"high": 95 % interval or None} over the
    answered records ``recs`` of one data set; None when the metric is not a per-question mean or
    the questions carry fewer than two types."""
    if metric not in MEAN_METRICS:
        return None
    groups: dict = {}
    for r in recs:
        if r.get("error") is None:
            groups.setdefault(str(r.get("qtype") or ""), []).append(r)
    if len(groups) < 2:
        return None
    out = {}
    for qtype, group in sorted(groups.items()):
        ci = score_interval(metric, group) or {}
        out[qtype] = {**dataset_score(metric, group), "low": ci.get("low"), "high": ci.get("high")}
    return out


def render_by_type(rows: list, dataset_names: list, block_of) -> str:
    """Markdown: one table per data set that has per-type scores in ``rows`` (each row's
    ``by_type``); ``block_of(row)`` names the row's budget. Empty when no data set has types."""
    parts = []
    for name in dataset_names:
        types = sorted({t for row in rows for t in (row.get("by_type") or {}).get(name) or {}})
        if not types:
            continue
        ref = next(row["by_type"][name] for row in rows if (row.get("by_type") or {}).get(name))
        head = ["Method", "Budget", *[f"{t or '(none)'} (n={ref[t]['n']})" if t in ref else t for t in types]]
        md = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + "|".join([":---", ":---"] + ["---:"] * len(types)) + "|"]
        for row in rows:
            per = (row.get("by_type") or {}).get(name)
            if not per or row.get("failed"):
                continue
            cells = []
            for t in types:
                c = per.get(t)
                cells.append("–" if c is None else f"{c['score']:.1f}" +
                             (f" [{c['low']:.1f}, {c['high']:.1f}]" if c["low"] is not None else ""))
            md.append("| " + " | ".join([row["label"], block_of(row), *cells]) + " |")
        parts.append("\n".join(md))
    return "\n\n".join(parts)
