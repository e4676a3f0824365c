"""The statistics of every cell of the retained-accuracy table, from its prediction records
(:func:`annotate_rows`; the formulas are in :mod:`vtoken.eval.statistics`):

* each data-set score gets a 95 % interval over its questions: the Wilson score interval (Wilson
  1927) where every per-question score is 0 or 1 and the headline is their mean (exact match,
  multiple choice, VQA accuracy on single-answer questions); otherwise a percentile bootstrap over
  the questions with a fixed seed (VQA accuracy, POPE F1 averaged over its categories, MME totals),
  recomputing the headline the way :func:`vtoken.eval.scores.dataset_score` does;
* Avg (mean over data sets of score / unpruned score) gets a bootstrap interval: the questions of
  each data set are resampled on their own, the row and the unpruned model on the same draw;
* each method-budget cell is compared with ``random`` at the same budget on the same questions by
  McNemar's exact test (McNemar 1947) on the per-question scores (POPE / MME: right / wrong per
  question); ``p >= ALPHA`` = not distinguishable from random.
"""

from __future__ import annotations

from vtoken.eval import metrics
from vtoken.eval.statistics import (ALPHA, BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, bootstrap_interval, is_binary, paired_sign_test,
                                     wilson_interval)

__all__ = ["REFERENCE", "score_function", "score_interval", "compare", "avg_interval", "annotate_rows", "legend"]

#: the method every row is tested against
REFERENCE = "random"


def score_function(metric: str, recs: list):
    """``f(indices) -> score`` (0-100, as :func:`~vtoken.eval.scores.dataset_score` computes it) of
    the questions ``recs[i]`` for a numpy array of indices (repeats allowed); ``None`` if empty."""
    import numpy as np

    ok = np.array([float(r["score"]) for r in recs])
    if metric in ("vqa", "exact", "mc"):
        return lambda idx: 100.0 * float(ok[idx].mean())
    cats = sorted({r.get("qtype") or ("all" if metric == "pope" else "") for r in recs})
    cat = np.array([cats.index(r.get("qtype") or ("all" if metric == "pope" else "")) for r in recs])
    if metric == "pope":
        pred = np.array([metrics.pope_answer(r["prediction"]) == "yes" for r in recs])
        lab = np.array([str(r["answers"][0]).strip().lower() == "yes" for r in recs])

        def pope(idx):
            c, p, y = cat[idx], pred[idx], lab[idx]
            n = len(cats)
            tp = np.bincount(c, p & y, n)
            fp = np.bincount(c, p & ~y, n)
            fn = np.bincount(c, ~p & y, n)
            prec = np.divide(tp, tp + fp, out=np.zeros(n), where=tp + fp > 0)
            rec = np.divide(tp, tp + fn, out=np.zeros(n), where=tp + fn > 0)
            f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(n), where=prec + rec > 0)
            return 100.0 * float(f1[np.bincount(c, minlength=n) > 0].mean())
        return pope
    if metric == "mme":  # per category: 100 * (acc + acc+), summed
        images = sorted({(r.get("qtype", ""), str(r.get("group", r["id"]))) for r in recs})
        img = np.array([images.index((r.get("qtype", ""), str(r.get("group", r["id"])))) for r in recs])
        img_cat = np.array([cats.index(c) for c, _ in images])

        def mme(idx):
            n, m = len(cats), len(images)
            asked = np.bincount(cat[idx], minlength=n)
            acc = np.bincount(cat[idx], ok[idx], n)
            seen = np.bincount(img[idx], minlength=m) > 0
            all_right = seen & (np.bincount(img[idx], 1.0 - ok[idx], m) == 0)
            plus = np.bincount(img_cat[seen], all_right[seen], n)
            n_img = np.bincount(img_cat[seen], minlength=n)
            present = asked > 0
            return float((100.0 * (acc[present] / asked[present] + plus[present] / n_img[present])).sum())
        return mme
    raise ValueError(f"unknown metric {metric!r}")


def score_interval(metric: str, recs: list):
    """``{"low", "high", "method"}`` (0-100 scale): the 95 % interval of a data set's score over its
    questions (see the module docstring), or ``None`` without questions."""
    if not recs:
        return None
    scores = [float(r["score"]) for r in recs]
    if metric in ("vqa", "exact", "mc") and is_binary(scores):
        lo, hi = wilson_interval(int(sum(scores)), len(scores))
        return {"low": 100.0 * lo, "high": 100.0 * hi, "method": "wilson"}
    ci = bootstrap_interval(len(recs), score_function(metric, recs))
    return None if ci is None else {"low": ci[0], "high": ci[1], "method": "bootstrap"}


def _paired(recs: list, ref: list) -> tuple:
    """The records of the questions both lists answered, in the same order."""
    mine = {str(r["id"]): r for r in recs}
    theirs = {str(r["id"]): r for r in ref}
    ids = sorted(set(mine) & set(theirs))
    return [mine[i] for i in ids], [theirs[i] for i in ids]


def compare(recs: list, ref: list):
    """McNemar's exact test of one cell against the reference method's cell on their common
    questions: ``{"n", "better", "worse", "p", "same"}`` (``same``: p >= ALPHA), ``None`` if no
    question is common."""
    a, b = _paired(recs, ref)
    if not a:
        return None
    test = paired_sign_test([float(r["score"]) for r in a], [float(r["score"]) for r in b])
    return {**test, "same": test["p"] >= ALPHA}


def avg_interval(metric_of: dict, recs: dict, upper: dict):
    """Bootstrap (low, high) of Avg = mean over data sets of 100 * score / unpruned score; ``recs``
    and ``upper`` map data-set names to the records of the row and of the unpruned model."""
    parts = []
    for name, metric in metric_of.items():
        a, b = _paired(recs.get(name, []), upper.get(name, []))
        if a:
            parts.append((score_function(metric, a), score_function(metric, b), len(a)))
    if not parts:
        return None

    def ratio(draws):
        vals = []
        for (f_row, f_up, _), idx in zip(parts, draws):
            up = f_up(idx)
            if up:
                vals.append(100.0 * f_row(idx) / up)
        return sum(vals) / len(vals) if vals else None
    return bootstrap_interval([n for _, _, n in parts], ratio)


def annotate_rows(rows: list, recs_of: list, metric_of: dict) -> dict:
    """Add ``intervals`` ({data set: :func:`score_interval`}), ``avg_retained_interval`` and
    ``vs_random`` ({data set: :func:`compare`}, or ``None`` for the upper bound, the reference itself
    or a budget without a reference row) to every row; ``recs_of[i]`` maps data-set names to row
    ``i``'s records. Returns ``{"reference", "present", "missing_keeps"}``: whether the reference
    method ran, the budgets where its row has no records, and the test's settings."""
    ref = {row["keep"]: recs for row, recs in zip(rows, recs_of) if row["method"] == REFERENCE}
    # budgets whose reference row has no answers (a row of its own with none, e.g. a method that
    # could not run, is simply not tested)
    missing = sorted(k for k, recs in ref.items() if not any(recs.get(name) for name in metric_of))
    for row, recs in zip(rows, recs_of):
        row["intervals"] = {name: score_interval(m, recs.get(name, [])) for name, m in metric_of.items()}
        row["avg_retained_interval"] = (None if row["method"] == "none"
                                        else avg_interval(metric_of, recs, recs_of[0]))
        row["vs_random"] = None
        if row["method"] in ("none", REFERENCE) or row["keep"] not in ref or row["keep"] in missing:
            continue
        cells = {name: compare(recs.get(name, []), ref[row["keep"]].get(name, [])) for name in metric_of}
        if any(c is not None for c in cells.values()):
            row["vs_random"] = cells
    return {"reference": REFERENCE, "present": bool(ref), "missing_keeps": missing, "alpha": ALPHA,
            "test": "exact two-sided McNemar (McNemar 1947)", "level": 0.95,
            "intervals": f"Wilson 1927 (0/1 scores), else percentile bootstrap ({BOOTSTRAP_SAMPLES} draws, seed "
                         f"{BOOTSTRAP_SEED})"}


def legend(summary: dict, mark: str) -> list:
    """The table's notes on its intervals and on the comparison with the reference method."""
    out = [f"[low, high] = 95 % interval over the questions: Wilson score interval (Wilson 1927) where every "
           f"per-question score is 0 or 1, else a percentile bootstrap ({BOOTSTRAP_SAMPLES} resamples of the "
           f"questions, seed {BOOTSTRAP_SEED}); Avg: the same bootstrap, each data set resampled on its own, the "
           f"row and the unpruned model on the same questions."]
    name = summary["reference"]
    if not summary["present"]:
        out.append(f"{mark} not marked: `{name}` is not in this run, so no row is tested against it "
                   f"(add {name} to --methods).")
        return out
    out.append(f"{mark} = not distinguishable from {name.capitalize()} at the same budget: exact two-sided McNemar "
               f"test (McNemar 1947) on the questions where the two score differently, p >= {ALPHA} (POPE / MME: "
               f"right or wrong per question). An unmarked cell differs from {name.capitalize()} (the scores "
               f"show in which direction).")
    if summary["missing_keeps"]:
        out.append(f"No {name} answers at keep={', '.join(summary['missing_keeps'])}: rows there are not tested.")
    return out
