"""The table of an eval run a device call's time limit cut short: only the (method, budget) pairs
whose every question was answered, written with ``vtoken eval``'s own report code.

    python benchmarks/eval/partial_table.py RUN.tar.gz OUTDIR -- VTOKEN_EVAL_ARGS...

VTOKEN_EVAL_ARGS: the run's own ``vtoken eval`` arguments (--model, --data, --limit, --methods,
--max-new-tokens; --out and --shard are ignored).

RUN.tar.gz is what ``benchmarks/eval/run_gpu.sh`` leaves per checkpoint (part files of the shards);
OUTDIR gets table.md / table.csv / results.json / predictions.jsonl and ``missing.txt`` (the pairs
left out, with how many answers each had). The data sets are regenerated from the same seed, so
the questions are the run's.
"""

from __future__ import annotations

import argparse
import collections
import tarfile
import tempfile
from pathlib import Path

from vtoken.eval.cli import build_parser, config_from_args
from vtoken.eval.loaders import load_dataset
from vtoken.eval.records import PRED_FILE, TIMING_FILE, atomic_jsonl, check_failure, keep_key, read_jsonl
from vtoken.eval.runner import merge_outputs, run_configs
from vtoken.eval.table import write_report


def complete_pairs(preds: list, datasets: list, configs: list) -> tuple:
    """(complete, missing): the (method, keep) pairs of ``configs`` whose every question of every
    data set has an answer record; missing maps each other pair to its number of answers."""
    have = collections.defaultdict(set)
    for r in preds:
        if r.get("error") is None:
            have[(r["method"], r["keep"])].add((r["dataset"], str(r["id"])))
    need = {(ds.name, str(s.id)) for ds in datasets for s in ds.samples}
    complete, missing = [], {}
    for method, keep in configs:
        got = have.get((method, keep_key(keep)), set())
        if need <= got:
            complete.append((method, keep))
        else:
            missing[(method, keep_key(keep))] = len(got & need)
    return complete, missing


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder or run_gpu.sh's NAME.tar.gz")
    p.add_argument("out")
    p.add_argument("eval_args", nargs=argparse.REMAINDER, help="-- then the run's vtoken eval arguments")
    args = p.parse_args(argv)
    eval_args = [a for a in args.eval_args if a != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = config_from_args(build_parser().parse_args(eval_args + ["--out", str(out), "--no-progress"]))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.run)
        if src.is_file():
            with tarfile.open(src) as tar:
                tar.extractall(tmp, filter="data")
            src = Path(tmp)
        merge_outputs(src)  # the part files into predictions.jsonl / timings.jsonl
        failures = []
        for part in src.glob("failed_configs.part-*.jsonl"):
            failures += read_jsonl(part, check_failure)
        preds = read_jsonl(src / PRED_FILE)
        datasets = [load_dataset(spec, config.limit, config.seed) for spec in config.data]
        configs = run_configs(config.methods, config.keeps)
        failed_pairs = {(f["method"], f["keep"]) for f in failures}
        complete, missing = complete_pairs(preds, datasets, configs)
        for pair in [pr for pr in missing if pr in failed_pairs]:
            missing.pop(pair)  # a pair that cannot run on this model: the table reports it as such
        kept = [c for c in configs if c in complete or (c[0], keep_key(c[1])) in failed_pairs]
        atomic_jsonl(out / PRED_FILE, preds)
        if (src / TIMING_FILE).exists():
            (out / TIMING_FILE).write_bytes((src / TIMING_FILE).read_bytes())
        write_report(out, config, datasets, kept, failed_configs=failures)
        total = sum(len(ds.samples) for ds in datasets)
        lines = [f"{m} keep={k}: {n} of {total} answers" for (m, k), n in missing.items()]
        (out / "missing.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        print(f"{len(complete)} complete pairs, {len(missing)} left out (missing.txt); table in {out}/table.md")


if __name__ == "__main__":
    main()
