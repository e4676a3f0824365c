"""A data set's headline score from its prediction records (:func:`dataset_score`): the number a
table cell shows, under the data set's metric (:mod:`vtoken.eval.metrics`)."""

from __future__ import annotations

import statistics

from vtoken.eval import metrics

__all__ = ["dataset_score"]


def dataset_score(metric: str, recs: list) -> dict:
    """Headline score (0-100, the table's number) and details of one data set's predictions.

    vqa / exact / mc: mean per-question score x 100. pope: F1 x 100, averaged over the POPE
    categories present (random / popular / adversarial), as the field reports it. mme: the total
    MME score (perception + cognition, sums of per-category acc + acc+).
    """
    recs = [r for r in recs if r.get("error") is None]
    n = len(recs)
    if n == 0:
        return {"score": None, "n": 0}
    if metric in ("vqa", "exact", "mc"):
        return {"score": 100.0 * sum(float(r["score"]) for r in recs) / n, "n": n}
    if metric == "pope":
        cats: dict = {}
        for r in recs:
            cats.setdefault(r.get("qtype") or "all", []).append(r)
        per = {c: metrics.pope_metrics([r["prediction"] for r in rs], [r["answers"][0] for r in rs])
               for c, rs in sorted(cats.items())}
        overall = metrics.pope_metrics([r["prediction"] for r in recs], [r["answers"][0] for r in recs])
        f1 = statistics.fmean(m["f1"] for m in per.values()) * 100.0
        acc = statistics.fmean(m["accuracy"] for m in per.values()) * 100.0
        return {"score": f1, "n": n, "f1": f1, "accuracy": acc, "overall": overall, "categories": per}
    if metric == "mme":
        s = metrics.mme_scores((r.get("qtype", ""), r.get("group", r["id"]), r["prediction"], r["answers"][0])
                               for r in recs)
        total = s["perception"] + s["cognition"] + s["other"]
        return {"score": total, "n": n, **s}
    raise ValueError(f"unknown metric {metric!r}")
