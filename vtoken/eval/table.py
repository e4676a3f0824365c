"""The report: the field's retained-accuracy table (Markdown + CSV), results.json and the plot,
all computed from ``predictions.jsonl`` / ``timings.jsonl`` (never from in-memory state, so a
resumed run reports exactly what a one-shot run does).

Table format (docs/DESIGN.md §6): a first row "Upper bound, N tokens (100%)" with the unpruned
model's raw scores, then one block per budget — "Retain 192 tokens (↓66.7%)" for token budgets,
"Retain 33.3% tokens (↓66.7%)" for fractions — with one row per method: the raw score per data set
and Avg = mean over data sets of score ÷ unpruned score, in percent. Every score shows its 95 %
interval over the questions and a cell not distinguishable from ``random`` at its budget is marked
(:mod:`vtoken.eval.significance`). Efficiency columns (GPU runs only) are medians over the run's
batches; on the CPU a note points to ``vtoken bench`` instead.

Token accounting (docs/DESIGN.md §4: the visual tokens a row really keeps, and whether it keeps its
block's budget) is computed by :mod:`vtoken.eval.accounting`; its names stay importable from here.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Optional

from vtoken.eval.accounting import (EQUIV_TOLERANCE, budget_check, budget_message, budget_target, decode_only,
                                    stages_text, token_accounting, tokens_text)
from vtoken.eval.by_type import render_by_type, type_scores
from vtoken.eval.config import config_dict
from vtoken.eval.plot import plot_retained
from vtoken.eval.scores import dataset_score
from vtoken.eval.significance import annotate_rows, legend
from vtoken.eval.records import PRED_FILE, TIMING_FILE, check_timing, keep_key, read_jsonl, read_predictions

__all__ = ["write_report", "dataset_score", "block_label", "budget_target", "budget_check", "token_accounting",
           "METHOD_NAMES", "library_versions", "EQUIV_TOLERANCE"]


METHOD_NAMES = {
    "none": "Unpruned", "fastv": "FastV", "sparsevlm": "SparseVLM", "pyramiddrop": "PyramidDrop",
    "vtc-cls": "VTC-CLS", "vtc_cls": "VTC-CLS", "fastervlm": "FasterVLM", "visionzip": "VisionZip",
    "zipvl": "ZipVL", "divprune": "DivPrune", "dart": "DART", "agile": "AgilePruner", "agilepruner": "AgilePruner",
    "flowcut": "FlowCut",
    "rollout": "Attn. rollout", "attnflow": "Attn. flow", "var": "VAR", "random": "Random", "uniform": "Uniform",
}


def method_label(name: str) -> str:
    return METHOD_NAMES.get(name, name)


def _fmt_pct(x: float) -> str:
    return f"{x:.1f}%"


def block_label(keep, upper_tokens: Optional[float]) -> str:
    """ "Retain 192 tokens (↓66.7%)" / "Retain 33.3% tokens (↓66.7%)"."""
    if isinstance(keep, int):
        if upper_tokens:
            red = max(0.0, 1.0 - keep / upper_tokens) * 100
            return f"Retain {keep} tokens (↓{red:.1f}%)"
        return f"Retain {keep} tokens"
    return f"Retain {keep * 100:.1f}% tokens (↓{(1 - keep) * 100:.1f}%)"


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def library_versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "transformers", "accelerate", "triton", "numpy", "PIL", "vtoken"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        pass
    return out


def _rows(config, datasets, configs, preds, timings, count: str = "final") -> list:
    by = {}
    for r in preds:
        by.setdefault((r["dataset"], r["method"], r["keep"]), []).append(r)
    tim = {}
    for t in timings:
        tim.setdefault((t.get("method"), t.get("keep")), []).append(t)
    names = [ds.name for ds in datasets]
    rows, recs_of = [], []
    for method, keep in configs:
        kk = keep_key(keep)
        scores, details, errors, by_type = {}, {}, {}, {}
        row_recs, recs_of_ds = [], {}
        for ds in datasets:
            ids = {s.id for s in ds.samples}
            recs = [r for r in by.get((ds.name, method, kk), []) if str(r["id"]) in ids]
            good = [r for r in recs if r.get("error") is None]
            errors[ds.name] = len(recs) - len(good)
            d = dataset_score(ds.metric, good)
            scores[ds.name] = d["score"]
            details[ds.name] = d
            row_recs += good
            recs_of_ds[ds.name] = good
            per_type = type_scores(ds.metric, good)
            if per_type:
                by_type[ds.name] = per_type
        ts = [t for t in tim.get((method, kk), []) if t.get("dataset") in names]
        eff = {
            "prefill_ms": _median(t.get("prefill_ms") for t in ts),
            "decode_ms_per_token": _median(t.get("decode_ms_per_token") for t in ts),
            "peak_mem_mib": max((t["peak_mem_mib"] for t in ts if t.get("peak_mem_mib") is not None), default=None),
            "kv_cache_mib_per_sample": _median(t.get("kv_cache_mib_per_sample") for t in ts),
            "batches": len(ts),
        }
        rows.append({
            "method": method, "keep": kk, "label": method_label(method), "scores": scores, "details": details,
            "errors": errors, "by_type": by_type, **token_accounting(method, keep, row_recs, count), "efficiency": eff,
        })
        recs_of.append(recs_of_ds)
    upper = rows[0]
    for row in rows:
        rel = []
        for name in names:
            ub, sc = upper["scores"].get(name), row["scores"].get(name)
            if ub and sc is not None:  # an unpruned score of 0 (or none) cannot normalise
                rel.append(100.0 * sc / ub)
        row["retained"] = {name: (100.0 * row["scores"][name] / upper["scores"][name]
                                  if upper["scores"].get(name) and row["scores"].get(name) is not None else None)
                           for name in names}
        row["avg_retained_pct"] = statistics.fmean(rel) if rel else None
    return rows, annotate_rows(rows, recs_of, {ds.name: ds.metric for ds in datasets})


def _num(x, digits=1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _score_str(metric: str, x) -> str:
    if x is None:
        return "–"
    return f"{x:.0f}" if metric == "mme" else f"{x:.1f}"


#: the mark of a cell not distinguishable from random at its budget
SAME_MARK = "≈"


def _cell(metric: str, row: dict, name: str) -> str:
    """``71.9 [68.1, 75.4]``, with `` ≈`` when the cell does not differ from random."""
    text, ci = _score_str(metric, row["scores"].get(name)), (row.get("intervals") or {}).get(name)
    if ci is not None:
        text += f" [{_score_str(metric, ci['low'])}, {_score_str(metric, ci['high'])}]"
    test = (row.get("vs_random") or {}).get(name)
    return text + f" {SAME_MARK}" if test and test["same"] else text


def _avg_cell(row: dict) -> str:
    if row["avg_retained_pct"] is None:
        return "–"
    ci = row.get("avg_retained_interval")
    return _fmt_pct(row["avg_retained_pct"]) + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def _eff_cols(on_gpu: bool) -> list:
    """Timing columns: only for GPU runs (CPU wall times on a shared machine are noise, not speed)."""
    return ["Prefill ms", "Decode ms/tok", "Peak MiB", "KV MiB/q"] if on_gpu else []


def _token_cols(count: str) -> list:
    cols = ["Kept (final)", "Equiv. (layer-avg)"]
    i = 0 if count == "final" else 1
    cols[i] += " ← budget"
    return cols + ["Kept per stage"]


def _stat_csv(row: dict, names: list) -> list:
    """CSV cells: avg interval, then per data set its interval and McNemar p against random."""
    ci = row.get("avg_retained_interval") or (None, None)
    out = [_csv(ci[0]), _csv(ci[1])]
    for n in names:
        iv, test = (row.get("intervals") or {}).get(n), (row.get("vs_random") or {}).get(n)
        out += [_csv(iv and iv["low"]), _csv(iv and iv["high"]), _csv(test and test["p"])]
    return out


def _render(rows, datasets, upper_tokens, on_gpu: bool, count: str = "final"):
    names = [ds.name for ds in datasets]
    metric_of = {ds.name: ds.metric for ds in datasets}
    header = ["Method", *names, "Avg", *_token_cols(count), *_eff_cols(on_gpu)]
    md = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    csv_rows = [["block", "method", "keep", *names, "avg_retained_pct", "avg_ci_low", "avg_ci_high",
                 *[f"{n}_{c}" for n in names for c in ("ci_low", "ci_high", "p_vs_random")],
                 "kept_tokens", "equivalent_tokens",
                 "kept_per_stage", "stage_layers", "budget_count", "budget_tokens", "budget_ok",
                 "prefill_ms", "decode_ms_per_token", "peak_mem_mib", "kv_cache_mib_per_sample", "device"]]
    blank = [""] * (len(header) - 1)
    current = None
    for row in rows:
        block = _block(row, upper_tokens)
        if block != current:
            md.append("| " + " | ".join([f"*{block}*", *blank]) + " |")
            current = block
        e = row["efficiency"] if on_gpu else dict.fromkeys(row["efficiency"])  # CPU: no timing numbers
        if row.get("failed"):
            md.append("| " + " | ".join([f"{row['label']} (failed)", *["–"] * (len(header) - 1)]) + " |")
            csv_rows.append([block, row["method"], row["keep"], *[""] * (len(csv_rows[0]) - 4), "failed"])
            continue
        chk = row.get("budget_check")
        label, tok_cells = row["label"], [_num(row["kept_tokens"]), _num(row["equivalent_tokens"])]
        if chk and chk["ok"] is False:  # the row does not keep its block's budget: say what it keeps
            label += " ⚠"
            i = 0 if chk["count"] == "final" else 1
            tok_cells[i] = f"{tok_cells[i]} ≠ {tokens_text(chk['target'])}"
        elif chk and chk["ok"] is None:
            label += " (decode)" if decode_only(row) else " (?)"
        eff_cells = [_num(e["prefill_ms"]), _num(e["decode_ms_per_token"], 2), _num(e["peak_mem_mib"], 0),
                     _num(e["kv_cache_mib_per_sample"], 2)] if on_gpu else []
        cells = [label, *[_cell(metric_of[n], row, n) for n in names], _avg_cell(row),
                 *tok_cells, stages_text(row), *eff_cells]
        md.append("| " + " | ".join(cells) + " |")
        csv_rows.append([block, row["method"], row["keep"],
                         *[_csv(row["scores"].get(n)) for n in names], _csv(row["avg_retained_pct"]),
                         *_stat_csv(row, names),
                         _csv(row["kept_tokens"]), _csv(row["equivalent_tokens"]),
                         ";".join(_csv(k) for k in row["kept_per_stage"] or []),
                         ";".join(str(x) for x in row["stage_layers"] or []),
                         count, _csv(chk["target"]) if chk else "",
                         "" if not chk or chk["ok"] is None else ("yes" if chk["ok"] else "no"),
                         _csv(e["prefill_ms"]),
                         _csv(e["decode_ms_per_token"]), _csv(e["peak_mem_mib"]), _csv(e["kv_cache_mib_per_sample"]),
                         "gpu" if on_gpu else "cpu"])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(csv_rows)
    return "\n".join(md) + "\n", buf.getvalue()


def _block(row: dict, upper_tokens) -> str:
    """The table block a row sits in: the upper bound, or its budget's "Retain ..." label."""
    if row["method"] == "none":
        return f"Upper bound, {upper_tokens:.0f} tokens (100%)" if upper_tokens else "Upper bound (100%)"
    return block_label(None if row["keep"] == "full" else _parse(row["keep"]), upper_tokens)


def _csv(x) -> str:
    return "" if x is None else f"{x:.4f}"


def _parse(k: str):
    try:
        return int(k)
    except ValueError:
        return float(k)


def write_report(out, config, datasets, configs, backend_info: dict = None, failed_configs: list = ()) -> dict:
    """Write table.md, table.csv, results.json, plot.png (and by_type.md where the questions have types)
    in ``out``; return the results."""
    out = Path(out)
    preds = read_predictions(out / PRED_FILE)
    timings = read_jsonl(out / TIMING_FILE, check_timing)
    count = getattr(config, "budget_count", "final")
    rows, stats = _rows(config, datasets, configs, preds, timings, count)
    fails: dict = {}
    for f in failed_configs or []:
        fails.setdefault((f["method"], f["keep"]), f["error"])
    for row in rows:
        if (row["method"], row["keep"]) in fails:
            row["failed"] = fails[(row["method"], row["keep"])]
            row["budget_check"] = None
    upper_tokens = rows[0]["visual_tokens"]
    devices = {t.get("device_name") for t in timings}
    on_gpu = any(t.get("peak_mem_mib") is not None for t in timings)
    data_info = []
    for ds in datasets:
        ids = {s.id for s in ds.samples}
        errs = {}
        for r in preds:
            if r["dataset"] == ds.name and str(r["id"]) in ids and r.get("error"):
                errs.setdefault(str(r["id"]), r["error"])
        ok_ids = {str(r["id"]) for r in preds if r["dataset"] == ds.name and r.get("error") is None}
        bad = {i: e for i, e in errs.items() if i not in ok_ids}
        data_info.append({
            "name": ds.name, "kind": ds.kind, "metric": ds.metric, "source": ds.source,
            "records": ds.total_records, "evaluated": len(ds.samples) - len(bad), "questions": len(ds.samples),
            "malformed_records": ds.malformed, "malformed_examples": ds.malformed_examples,
            "failed_questions": len(bad), "failed_examples": dict(list(sorted(bad.items()))[:5]),
        })
    info = dict(backend_info or {})
    # the devices that answered (every batch's timing names its device): a report written later by
    # another process (a resumed or merged run) describes the run, not itself
    device_desc = ", ".join(sorted(d for d in devices if d)) or info.get("device_name") or ("GPU" if on_gpu else "cpu")
    md, csv_text = _render(rows, datasets, upper_tokens, on_gpu, count)
    if count == "final":
        budget_note = ("Budget blocks count FINAL visual tokens: a row in \"Retain N\" keeps N visual tokens per "
                       "image after its last pruning stage (exactly; column \"Kept (final)\").")
    else:
        budget_note = ("Budget blocks count LAYER-AVERAGED (\"equivalent\") visual tokens (docs/DESIGN.md §4): a row in "
                       "\"Retain N\" averages N visual tokens over the LLM's layers (within "
                       f"{EQUIV_TOLERANCE:.0%} or half a token; column \"Equiv. (layer-avg)\").")
    mismatches = []
    for row in rows:
        if row["method"] != "none" and not row.get("failed"):
            msg = budget_message(row, block_label(_parse(row["keep"]), upper_tokens))
            if msg:
                mismatches.append(msg)
    notes = [
        *legend(stats, SAME_MARK),
        f"Model `{config.model}`, dtype {info.get('dtype', config.dtype)}, batch size {config.batch_size}, "
        f"max {config.max_new_tokens} new tokens, greedy; device: {device_desc}.",
        "Scores: " + "; ".join(f"{d['name']} = {_METRIC_DESC[d['metric']]} (n={d['evaluated']})"
                               for d in data_info) + ".",
        budget_note + " Kept (final), Equiv. (layer-averaged visual tokens) and Kept per stage (L<layer>:<tokens>) "
        "are measured per question from the pruning handle's stats and averaged over questions. "
        "⚠ = the row does not keep its block's budget by this count (what it keeps is shown; it is not "
        "compared at equal tokens).",
        "Avg = mean over data sets of score / unpruned score.",
        ("Efficiency: medians over batches, synchronised GPU timings; prefill = first forward of generate "
         "(vision encoder + LLM prefill) per batch; peak = max allocated; KV = prefill KV cache per question."
         + ("" if getattr(config, "warmup", True) else
            " Run with --no-warmup: each method's first batch includes its one-time costs (autotuning, "
            "first launches).")
         + ("" if not any(t.get("vision_reused") for t in timings) else
            " Run with --reuse-vision on: where a batch's vision features were computed by an earlier "
            "row, that row's prefill leaves the vision tower out.")
         if on_gpu else
         "No timing columns: this run is on the CPU, whose wall times (a shared machine, unsynchronised) say "
         "nothing about speed; speed is measured with `vtoken bench` on a GPU (raw CPU times: timings.jsonl)."),
    ]
    for name, layers in sorted((info.get("scaled_layers") or {}).items()):
        notes.append(f"{name}: the paper's stage layers (for 32-layer LLMs) scaled to this model's depth: "
                     f"layers={tuple(layers)}.")
    for row in rows:
        if row.get("failed"):
            notes.append(f"{row['label']} at keep={row['keep']} could not run: {row['failed']}")
    notes += [f"(?) {m}" if m.endswith("unverified.") else f"(decode) {m}" if " is a decode-time plan" in m
              else f"⚠ {m}" for m in mismatches]
    failed = [d for d in data_info if d["malformed_records"] or d["failed_questions"]]
    if failed:
        notes.append("Skipped: " + "; ".join(
            f"{d['name']}: {d['malformed_records']} malformed record(s), {d['failed_questions']} unreadable/failed "
            f"question(s)" for d in failed) + " (details in results.json).")
    by_type_md = render_by_type(rows, [ds.name for ds in datasets], lambda row: _block(row, upper_tokens))
    if by_type_md:
        notes.append("Scores per question type, with 95 % Wilson intervals: by_type.md.")
        (out / "by_type.md").write_text(f"# Scores per question type ({config.model})\n\n{by_type_md}\n",
                                        encoding="utf-8")
    else:
        (out / "by_type.md").unlink(missing_ok=True)  # a resumed run's data sets may have changed
    (out / "table.md").write_text(md + "\n" + "\n".join(f"- {n}" for n in notes) + "\n", encoding="utf-8")
    (out / "table.csv").write_text(csv_text, encoding="utf-8")
    plot_note = plot_retained(out / "plot.png", rows, upper_tokens,
                      f"{config.model}: {', '.join(ds.name for ds in datasets)}", count)
    results = {
        "config": config_dict(config),
        "versions": library_versions(),
        "backend": info,
        "devices": sorted(d for d in devices if d),
        "upper_bound_tokens": upper_tokens,
        "budget_count": count,
        "budget_mismatches": mismatches,
        "statistics": stats,
        "datasets": data_info,
        "rows": rows,
        "table_notes": notes,
        "failed_configs": [{"method": r["method"], "keep": r["keep"], "error": r["failed"]} for r in rows
                           if r.get("failed")],
    }
    if plot_note:
        results["plot"] = plot_note
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str), encoding="utf-8")
    return results


_METRIC_DESC = {
    "vqa": "VQA accuracy", "exact": "exact match", "pope": "POPE F1 (mean over categories)",
    "mc": "multiple-choice accuracy", "mme": "MME total (perception + cognition)",
}
