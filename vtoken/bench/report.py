"""Markdown report and the short summary (targets of issue 8) of ``vtoken bench`` results."""

from __future__ import annotations

SUITE_COLUMNS = {
    "users": ["model", "batch", "cache", "method", "keep", "prompt_tokens", "kept_tokens_last_layer", "ttft_ms",
              "ttft_floor_ms", "decode_ms_per_token", "decode_floor_ms", "e2e_ms", "new_tokens", "peak_gb"],
    "llava": ["batch", "method", "keep", "context", "context_after", "ttft_ms", "vision_ms", "decode_ms_per_token",
              "tokens_per_s", "kv_cache_mb", "peak_mem_gb", "speedup_vs_unpruned", "ratio_to_oracle", "runs"],
    "llava-next": ["batch", "method", "keep", "visual_tokens", "kept_visual", "context", "context_after", "ttft_ms",
                   "vision_ms", "decode_ms_per_token", "tokens_per_s", "kv_cache_mb", "peak_mem_gb",
                   "speedup_vs_unpruned", "ratio_to_oracle", "runs"],
    "qwen-long": ["vision_path", "images", "visual_tokens", "method", "keep", "kept_visual", "context",
                  "context_after", "ttft_ms", "vision_ms", "vision_share", "lm_ms", "kv_cache_mb", "peak_mem_gb",
                  "speedup_vs_unpruned", "lm_speedup_vs_unpruned", "ratio_to_oracle", "runs"],
    "video": ["batch", "method", "keep", "visual_tokens", "kept_per_stage", "context", "context_after", "ttft_ms",
              "vision_ms", "decode_ms_per_token", "tokens_per_s", "kv_cache_mb", "peak_mem_gb", "speedup_vs_unpruned",
              "ratio_to_oracle", "runs", "skipped"],
    "qwen-lm": ["visual_tokens", "method", "keep", "kept_visual", "context", "context_after", "ttft_ms",
                "peak_mem_gb", "speedup_vs_unpruned", "ratio_to_oracle", "runs"],
    "peers": ["method", "attn", "keep", "visual_tokens", "kept_visual", "context", "context_after", "ttft_ms",
              "vision_ms", "kv_cache_mb", "peak_mem_gb", "speedup_vs_unpruned", "speedup_vs_fastv-eager-mask",
              "speedup_vs_fastv-eager-drop", "speedup_vs_llmc-rerun", "ratio_to_oracle", "runs"],
    "maxbatch": ["method", "keep", "context", "new_tokens", "max_batch", "first_oom_batch", "resolution",
                 "max_batch_vs_unpruned", "gen_tokens_per_s_at_max", "weights_gb", "cap_gib", "probes"],
}

SUITE_TITLES = {
    "users": "model.generate as users call it: dynamic cache vs cache_implementation='static' (transformers' "
             "compiled decode), unpruned vs pruned",
    "llava": "LLaVA-1.5-7B (576 visual tokens per image; keep = tokens per image)",
    "llava-next": "LLaVA-NeXT-7B (vicuna; one 672x672 image = 5 crops, 2880 prunable + 48 newline tokens; "
                  "keep = k/576 of each image's prunable tokens, i.e. k tokens per 576-token crop equivalent)",
    "qwen-long": "Qwen2.5-VL-7B, full model (vision tower included), batch 1; images of 1792x1792 px (4096 tokens each); "
                 "vision_ms = vision tower inside the same TTFT runs, lm_ms = TTFT - vision_ms",
    "video": "Qwen2.5-VL-7B, full model, one video per sample (video_grid_thw = temporal groups x patches; "
             "keep = fraction of the video's tokens); the oracle is fed the tokens kept after the last stage; "
             "skipped = vtoken refused the method on video",
    "qwen-lm": "Qwen2.5-VL-7B language model alone (random image embeddings), batch 1",
    "peers": "Peer styles of attention scoring, LLaVA-1.5-7B, 7 images (4032 visual tokens), batch 1",
    "maxbatch": "Largest batch within the memory cap, LLaVA-1.5-7B, generate with 64 new tokens (min = max = 64)",
}


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, list):
        if v and isinstance(v[0], dict) and "batch" in v[0]:
            return " ".join(f"{p['batch']}{'✓' if p.get('fits') else '✗'}" for p in v)
        return str(v)
    return str(v)


def render_markdown(meta: dict, rows: list) -> str:
    tiny = " (TINY configs: code-path check, timings meaningless)" if meta.get("tiny") else ""
    lines = [f"# vtoken bench — {meta.get('device', '?')}{tiny}", "",
             f"torch {meta.get('torch')}, transformers {meta.get('transformers')}, triton {meta.get('triton')}, "
             f"python {meta.get('python')}; {meta.get('weights', 'random')} {meta.get('dtype')} weights, "
             f"{meta.get('attn')} attention unless noted; timing: synchronised, one warm-up, median of up to "
             f"{meta.get('repeats')} runs (2 for calls over {meta.get('long_ms')} ms; `runs` column); "
             f"command: `{meta.get('command')}`", ""]
    if meta.get("build_s"):
        lines += ["Model build times (s): " + ", ".join(f"{k} {v}" for k, v in meta["build_s"].items()), ""]
    if meta.get("suite_s"):
        lines += ["Suite wall times (s): " + ", ".join(f"{k} {v}" for k, v in meta["suite_s"].items()), ""]
    summary = summarize(rows)
    if summary:
        lines += ["## Summary", "", "| suite | measure | value | target |", "|---|---|---|---|"]
        lines += [f"| {s} | {m} | {v} | {t} |" for s, m, v, t in summary]
        lines.append("")
    lines += method_table(rows)
    suites = []
    for r in rows:
        if r.get("suite") not in suites:
            suites.append(r.get("suite"))
    for s in suites:
        cols = SUITE_COLUMNS.get(s) or sorted({k for r in rows if r.get("suite") == s for k in r})
        sub = [r for r in rows if r.get("suite") == s]
        cols = [c for c in cols if any(r.get(c) is not None for r in sub)]
        lines += [f"## {s}: {SUITE_TITLES.get(s, '')}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in sub:
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        notes = sorted({r["note"] for r in sub if r.get("note")})
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    if meta.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {s}" for s in meta["skipped"]] + [""]
    if meta.get("errors"):
        lines += ["## Errors", ""] + [f"- {s}" for s in meta["errors"]] + [""]
    return "\n".join(lines) + "\n"


def method_table(rows: list) -> list:
    """Markdown lines of the per-method summary of the ``llava`` suite (empty with one method):
    one row per method, per batch the TTFT at each budget, the TTFT ratio to the oracle at the
    smallest budget and decode ms/token there."""
    sub = [r for r in rows if r.get("suite") == "llava" and r.get("method") not in ("oracle", "unpruned")
           and not str(r.get("method")).startswith("peer:")]
    methods = list(dict.fromkeys(r["method"] for r in sub))
    if len(methods) < 2:
        return []
    batches = sorted({r["batch"] for r in sub})
    keeps = list(dict.fromkeys(r["keep"] for r in sub))
    last = keeps[-1]
    head = ["method"] + [f"b{b} TTFT ms {'/'.join(str(k) for k in keeps)}" for b in batches]
    head += [f"b{b} x oracle @{last}" for b in batches] + [f"b{b} decode ms/tok @{last}" for b in batches]
    out = ["## Per method (LLaVA-1.5-7B, eager transformers path)", "",
           "TTFT ms at each budget (tokens per image), TTFT / oracle TTFT and decode ms/token at the smallest "
           "budget; unpruned first.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {b: next((r for r in rows if r.get("suite") == "llava" and r.get("method") == "unpruned"
                     and r.get("batch") == b), {}) for b in batches}
    cells = ["unpruned"] + [str(base[b].get("ttft_ms", "")) for b in batches] + ["" for _ in batches]
    cells += [_fmt(base[b].get("decode_ms_per_token")) for b in batches]
    out.append("| " + " | ".join(cells) + " |")
    for m in methods:
        cells = [m]
        for b in batches:
            got = {r["keep"]: r for r in sub if r["method"] == m and r["batch"] == b}
            cells.append(" / ".join(str(got[k]["ttft_ms"]) if k in got else "–" for k in keeps))
        for b in batches:
            r = next((r for r in sub if r["method"] == m and r["batch"] == b and r["keep"] == last), {})
            cells.append(_fmt(r.get("ratio_to_oracle")))
        for b in batches:
            r = next((r for r in sub if r["method"] == m and r["batch"] == b and r["keep"] == last), {})
            cells.append(_fmt(r.get("decode_ms_per_token")))
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def _find(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def summarize(rows: list) -> list:
    """[(suite, measure, value, target)]: the headline numbers present in ``rows``, one line per
    configuration."""
    out = []
    by = {}
    for r in rows:
        by.setdefault(r.get("suite"), []).append(r)
    # qwen-long: one line per (vision path, visual tokens)
    groups = {}
    for r in by.get("qwen-long", []):
        groups.setdefault((r.get("vision_path"), r.get("visual_tokens")), {})[str(r.get("method"))] = r
    for (path, vis), g in groups.items():
        base, oracle = g.get("unpruned"), g.get("oracle")
        pruned = next((v for k, v in g.items() if k.startswith("fastv")), None)
        if not (base and pruned and oracle):
            continue
        val = (f"TTFT {base['ttft_ms']} / {pruned['ttft_ms']} / {oracle['ttft_ms']} ms (unpruned / fastv / oracle); "
               f"fastv/oracle {pruned.get('ratio_to_oracle')}; vision {base.get('vision_ms')} ms = "
               f"{round(100 * (base.get('vision_share') or 0))}% of unpruned TTFT; LM part "
               f"{pruned.get('lm_speedup_vs_unpruned')}x faster")
        out.append(("qwen-long", f"{vis} visual, {path} vision, keep {pruned.get('keep')}", val,
                    "fastv/oracle <= 1.10" + ("; LM >= 5x" if (vis or 0) >= 16000 else "")))
    # qwen-lm: one line per visual-token count
    groups = {}
    for r in by.get("qwen-lm", []):
        groups.setdefault(r.get("visual_tokens"), {})[str(r.get("method"))] = r
    for vis, g in groups.items():
        base, oracle = g.get("unpruned"), g.get("oracle")
        pruned = next((v for k, v in g.items() if k.startswith("fastv")), None)
        if base and pruned and oracle:
            out.append(("qwen-lm", f"{vis} visual, keep {pruned.get('keep')}",
                        f"LM prefill {base['ttft_ms']} / {pruned['ttft_ms']} / {oracle['ttft_ms']} ms (unpruned / fastv "
                        f"/ oracle); {pruned.get('speedup_vs_unpruned')}x faster; x{pruned.get('ratio_to_oracle')} oracle",
                        ">= 5x at 16K" if (vis or 0) >= 16000 else ""))
    # llava / llava-next: one line per batch
    for suite in ("llava", "llava-next"):
        groups = {}
        for r in by.get(suite, []):
            groups.setdefault(r.get("batch"), []).append(r)
        for batch, rs in groups.items():
            base = next((r for r in rs if r.get("method") == "unpruned"), None)
            pruned = [r for r in rs if str(r.get("method")).startswith("fastv")]
            if not base or not pruned:
                continue
            val = (f"TTFT unpruned {base['ttft_ms']} ms; fastv " +
                   ", ".join(f"{r.get('keep')}: {r['ttft_ms']} ms (x{r.get('ratio_to_oracle')} oracle)" for r in pruned))
            out.append((suite, f"batch {batch}", val, "keep 64 <= 1.10x oracle" if suite == "llava" else ""))
    # video: one line per batch, every method
    groups = {}
    for r in by.get("video", []):
        groups.setdefault(r.get("batch"), []).append(r)
    for batch, rs in groups.items():
        base = next((r for r in rs if r.get("method") == "unpruned"), None)
        pruned = [r for r in rs if r.get("method") not in ("unpruned", "oracle") and "ttft_ms" in r]
        if not base or not pruned:
            continue
        val = (f"TTFT unpruned {base['ttft_ms']} ms; " +
               ", ".join(f"{r['method']} {r['ttft_ms']} ms (x{r.get('ratio_to_oracle')} oracle)" for r in pruned))
        out.append(("video", f"batch {batch}, {base.get('visual_tokens')} visual, keep {pruned[0].get('keep')}", val, ""))
    # peers
    for r in by.get("peers", []):
        m = str(r.get("method", ""))
        if not m.startswith("fastv"):
            continue
        parts = [f"{peer} {r[f'speedup_vs_{peer}']}x" for peer in ("fastv-eager-mask", "fastv-eager-drop", "llmc-rerun")
                 if r.get(f"speedup_vs_{peer}") is not None]
        out.append(("peers", f"{m} TTFT {r['ttft_ms']} ms at {r.get('visual_tokens')} visual: speedup over",
                    ", ".join(parts) + f"; x{r.get('ratio_to_oracle')} oracle", ">= 2x over fastv-eager"))
    # maxbatch
    for r in by.get("maxbatch", []):
        val = f"{r.get('max_batch')} (first OOM {r.get('first_oom_batch')})"
        if r.get("max_batch_vs_unpruned") is not None:
            val += f" = {r['max_batch_vs_unpruned']}x unpruned"
        if r.get("gen_tokens_per_s_at_max") is not None:
            val += f"; {r['gen_tokens_per_s_at_max']} new tok/s there"
        out.append(("maxbatch", f"largest batch, {r.get('method')}", val,
                    ">= 3x unpruned" if r.get("max_batch_vs_unpruned") is not None else ""))
    return out


def summary_text(rows: list) -> str:
    s = summarize(rows)
    if not s:
        return "(no summary rows)"
    w = max(len(x[1]) for x in s)
    return "\n".join(f"{suite:<10} {measure:<{w}}  {value}{('   [target ' + t + ']') if t else ''}"
                     for suite, measure, value, t in s)
