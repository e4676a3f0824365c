"""``benchmarks/e2e/profile_ttft.py --tiny`` runs the GPU profile's code on the CPU (its graphs emulated), so a
device session does not spend its time on a script that fails: the ``head`` variant replays the captured
prefill head for the keep-all and the pruned handle, and every row lands in ``summary.json``."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_ttft_dry_run_replays_the_captured_head(tmp_path):
    spec = importlib.util.spec_from_file_location("profile_ttft", os.path.join(ROOT, "benchmarks", "e2e", "profile_ttft.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path), "--tiny", "--methods", "none,fastv", "--variants", "merged,head",
                        "--decode-batch", "2"]) == 0
    rows = json.load(open(tmp_path / "summary.json"))["rows"]
    ttft = {(r["variant"], r["method"]): r for r in rows if "ttft_ms_median" in r and "batch" not in r}
    assert set(ttft) == {(v, m) for v in ("merged", "head") for m in ("none", "fastv")}
    for (variant, method), row in ttft.items():
        assert row["engine_last"]["head_graph"] == ("replayed" if variant == "head" else None), (variant, method)
        assert (tmp_path / f"{method}{'-head' if variant == 'head' else ''}.ops.txt").exists()
    assert len([r for r in rows if r.get("batch") == 2]) == 8  # 2 variants x 2 methods x 2 token choices
