"""The users suite's rows (``vtoken bench --suite users``) from one or more ``results.json`` as one
markdown table per model: TTFT, decode ms/token and end-to-end time, each with its ratio to the
unpruned row of the same batch and cache (from the same file: every ratio compares rows of one
run), peak memory and the row's floors.

    python benchmarks/e2e/users_table.py DIR/results.json [DIR2/results.json ...]
"""

from __future__ import annotations

import json
import sys


def _ratio(r: dict, base: dict | None, key: str) -> str:
    if base is None or r is base or not base.get(key):
        return ""
    return f" ({base[key] / r[key]:.2f}×)"


def table(paths: list) -> str:
    rows = []
    for i, path in enumerate(paths):
        with open(path) as f:
            rows += [dict(r, _run=i) for r in json.load(f)["results"] if r.get("suite") == "users"]
    base = {(r["_run"], r["model"], r["batch"], r["cache"]): r for r in rows if r["method"] == "unpruned"}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        out += [f"**{model}** (speed-up over the unpruned row of the same batch and cache in brackets)", "",
                "| batch | `generate` cache | method | TTFT ms | decode ms/token | "
                f"{rows[0]['new_tokens']} tokens ms | peak GB | TTFT floor ms | decode floor ms |",
                "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted((r for r in rows if r["model"] == model), key=lambda r: (r["batch"], r["cache"], r["_run"])):
            b = base.get((r["_run"], r["model"], r["batch"], r["cache"]))
            out.append(f"| {r['batch']} | {r['cache']} | {r['method']} | {r['ttft_ms']:.1f}{_ratio(r, b, 'ttft_ms')} | "
                       f"{r['decode_ms_per_token']:.2f}{_ratio(r, b, 'decode_ms_per_token')} | "
                       f"{r['e2e_ms']:,.0f}{_ratio(r, b, 'e2e_ms')} | {r['peak_gb']:.1f} | {r['ttft_floor_ms']:.1f} | "
                       f"{r['decode_floor_ms']:.2f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(table(sys.argv[1:]))
