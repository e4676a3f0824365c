"""One line per method of a ``vtoken eval`` run: the average retained accuracy (with its 95 %
interval) at each budget, and which data sets' scores are not distinguishable from ``random``.

    python benchmarks/eval/compact_table.py RESULTS_JSON [RESULTS_JSON ...]

Reads the ``results.json`` that ``vtoken eval`` (or ``partial_table.py``) writes; prints a Markdown
table per file. A cell reads ``84.5 [81.6, 87.2]`` (Avg retained %, interval), followed by ``≈D``
/ ``≈S`` ... for each data set (by initial) whose McNemar test against ``random`` at that budget
gives p >= 0.05, ``⚠`` where the final kept count is not the budget (adaptive methods), and ``=``
where the method changed no first answer token (decode-time stages: they act after the token the
table scores); ``–`` where the pair is missing, ``failed`` where it could not run.
"""

from __future__ import annotations

import json
import sys


def cell(row: dict) -> str:
    if row.get("avg_retained_pct") is None:  # the method could not run (the report says why)
        return "failed" if row.get("failed") else "–"
    iv = row.get("avg_retained_interval")
    text = f"{row['avg_retained_pct']:.1f}" + (f" [{iv[0]:.1f}, {iv[1]:.1f}]" if iv else "")
    same = [ds[0] for ds, v in (row.get("vs_random") or {}).items() if v.get("same")]
    if same:
        text += " ≈" + "".join(same)
    check = row.get("budget_check") or {}
    if row.get("kept_tokens") is None:  # no prefill stage: a decode-time plan
        text += " ="
    elif check and not check.get("ok", True):
        text += f" ⚠{check['measured']:.0f}"
    return text


def table(path: str) -> str:
    data = json.load(open(path))
    rows = data["rows"]
    budgets = []
    for r in rows:
        if r["method"] != "none" and r["keep"] not in budgets:
            budgets.append(r["keep"])
    by = {}
    for r in rows:
        if r["method"] != "none":
            by.setdefault(r["label"], {})[r["keep"]] = r
    unpruned = next(r for r in rows if r["method"] == "none")
    scores = ", ".join(f"{k} {v:.1f}" for k, v in unpruned["scores"].items())
    out = [f"Unpruned: {scores} (n = {', '.join(str(v['n']) for v in unpruned['details'].values())})", "",
           "| method | " + " | ".join(f"keep {b}" for b in budgets) + " |",
           "|---|" + "---:|" * len(budgets)]
    order = sorted(by, key=lambda m: -max((by[m][b]["avg_retained_pct"] or 0 for b in by[m]), default=0))
    for m in order:
        out.append(f"| {m} | " + " | ".join(cell(by[m][b]) if b in by[m] else "–" for b in budgets) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(f"### {p}\n")
        print(table(p))
        print()
