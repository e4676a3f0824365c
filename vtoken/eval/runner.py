"""The eval loop: every (method, budget) on every data set, resumable, sharded, reported.

Files in the output directory:

* ``predictions.jsonl`` — one line per (dataset, id, method, keep): prediction, answers, score,
  visual tokens; the source of every number in the table.
* ``timings.jsonl`` — one line per generated batch (prefill ms, decode ms/token, peak memory, KV).
* ``run_config.json`` — what the predictions depend on (model, dtype, max_new_tokens); a re-run
  with the same ``--out`` must match it.
* ``table.md``, ``table.csv``, ``results.json``, ``plot.png`` (and ``by_type.md``: scores per question
  type) — written by :func:`write_report`.
* while running: ``predictions.part-<rank>.jsonl`` / ``timings.part-<rank>.jsonl``, appended
  and flushed after every batch, merged into the files above at the end.

Resuming: every existing prediction line (merged file and part files) marks its
(dataset, id, method, keep) done; only the rest is computed. Batches are fixed slices of each
rank's shard, so a resumed batch holds the same questions as in a one-shot run.

Sharding: rank r of w takes questions ``r, r + w, r + 2w, ...`` of every data set
(``accelerate launch`` sets rank and world size; :func:`run_eval` takes them as arguments too);
after a barrier rank 0 merges the part files and writes the report.

What the runner and the report share lives below both: the output files' records, budget keys and
JSONL reading in :mod:`vtoken.eval.records`, the run's :class:`EvalConfig` in :mod:`vtoken.eval.config`
and the batch loop in :mod:`vtoken.eval.batches` (imports go cli -> runner -> batches / table ->
accounting / records / config / significance -> statistics, never back).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from vtoken.errors import DataFormatError
from vtoken.eval.batches import compute_batches, score_sample
from vtoken.eval.config import BUDGET_COUNTS, DEFAULT_METHODS, QUICK_METHODS, EvalConfig
from vtoken.eval.jsonio import json_kind
from vtoken.eval.loaders import load_dataset
from vtoken.eval.records import (CONFIG_FILE, PRED_FILE, TIMING_FILE, atomic_jsonl, atomic_text, check_failure,
                                 check_prediction, existing_predictions, existing_timings, keep_key, log_message,
                                 parse_keep, read_jsonl, read_predictions, record_key)
from vtoken.eval.table import write_report

# importable from here as before they moved to vtoken.eval.batches / config / records
from vtoken.eval.batches import ConfigFailed  # noqa: F401
from vtoken.eval.config import config_dict  # noqa: F401
from vtoken.eval.records import PRED_KEYS  # noqa: F401

__all__ = ["EvalConfig", "run_eval", "merge_outputs", "keep_key", "parse_keep", "read_jsonl", "read_predictions",
           "check_prediction", "score_sample", "DEFAULT_METHODS", "QUICK_METHODS", "BUDGET_COUNTS"]


def run_configs(methods: list, keeps: list) -> list:
    """(method, keep) pairs: the upper bound first, then one block per budget."""
    out = [("none", None)]
    for k in keeps:
        for m in methods:
            if m != "none":
                out.append((m, k))
    return out


def _check_identity(out: Path, config: EvalConfig, rank: int) -> None:
    path = out / CONFIG_FILE
    ident = config.run_identity()
    if path.exists():
        try:
            old = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):  # e.g. emptied by a kill while it was written
            log_message(f"vtoken eval: {path} is not readable JSON (a run killed while writing it?); "
                        f"it is written again for {ident}")
            old = None
            if rank == 0:
                atomic_text(path, json.dumps(ident, indent=2, sort_keys=True))
        if old is not None and not isinstance(old, dict):
            raise DataFormatError(
                f"{path}, line 1: expected a JSON object like {json.dumps(ident, sort_keys=True)}, got "
                f"{json_kind(old)}; fix or delete it and run again (nothing in {out} was changed)")
        if old is not None and old != ident:
            diff = ", ".join(f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in ident.items() if old.get(k) != v)
            raise SystemExit(
                f"--out {out} holds predictions of a different run ({diff}); "
                "use another --out, or delete that directory to start over"
            )
    elif rank == 0:
        atomic_text(path, json.dumps(ident, indent=2, sort_keys=True))


def run_eval(
    config: EvalConfig,
    backend=None,
    backend_factory: Optional[Callable] = None,
    rank: int = 0,
    world: int = 1,
    barrier: Optional[Callable] = None,
    datasets: Optional[list] = None,
    report: bool = True,
) -> Optional[dict]:
    """Run (or resume) an eval and, on rank 0, write the report; returns the results dict on
    rank 0 (``None`` elsewhere or with ``report=False``).

    backend / backend_factory: a ready backend, or a zero-argument callable building one (called
        only if something is left to compute); default :func:`vtoken.eval.backend.load_backend`.
    rank, world: this process's shard (questions ``rank, rank + world, ...`` of every data set).
    barrier: called before rank 0 merges; by default ranks > 0 leave a marker file that rank 0
        waits for (:func:`_file_barrier`).
    datasets: already loaded :class:`EvalDataset` objects instead of ``config.data``.
    """
    out = Path(config.out)
    try:
        datasets, configs, backend = _compute_shard(config, backend, backend_factory, rank, world, datasets, out)
    except BaseException as exc:  # a shard that stops tells rank 0, which would otherwise wait for it
        if world > 1 and barrier is None and rank != 0:
            _mark_failed(out, rank, world, exc)
        raise

    if barrier is not None:
        barrier()
    elif world > 1:
        _file_barrier(out, rank, world, shard_done=lambda r: _shard_complete(out, r, world, datasets, configs))
    if rank != 0 or not report:
        return None
    merge_outputs(out)
    info = dict(getattr(backend, "info", {}) or {}) if backend is not None else {}
    failures = []
    for r in range(world):
        failures += read_jsonl(out / f"failed_configs.part-{r}.jsonl", check_failure)
    for part in out.glob("failed_configs.part-*.jsonl"):
        part.unlink()
    return write_report(out, config, datasets, configs, backend_info=info, failed_configs=failures)


def _compute_shard(config, backend, backend_factory, rank, world, datasets, out):
    """Everything of :func:`run_eval` before the barrier: this rank's predictions and failures
    written to its part files; returns (datasets, configs, backend)."""
    if config.budget_count not in BUDGET_COUNTS:
        raise ValueError(f"budget_count must be one of {BUDGET_COUNTS}; got {config.budget_count!r}")
    out.mkdir(parents=True, exist_ok=True)
    # everything already written is read (and vetted) before anything is written: a file this
    # run cannot use stops it with the file and line, and leaves the directory as it was
    existing = existing_predictions(out, log=config.progress)
    existing_timings(out)
    _check_identity(out, config, rank)
    if datasets is None:
        datasets = [load_dataset(spec, config.limit, config.seed) for spec in config.data]
    _dedupe_names(datasets)
    configs = run_configs(config.methods, config.keeps)

    done = {record_key(r) for r in existing if r.get("error") is None}
    # pending work: per (method, keep), per dataset, fixed batches of this rank's shard
    work = []
    total = 0
    for method, keep in configs:
        kk = keep_key(keep)
        for ds in datasets:
            shard = list(range(rank, len(ds.samples), world))
            for b0 in range(0, len(shard), config.batch_size):
                idx = [i for i in shard[b0:b0 + config.batch_size]
                       if (ds.name, ds.samples[i].id, method, kk) not in done]
                if idx:
                    work.append((method, keep, ds, b0 // config.batch_size, idx))
                    total += len(idx)

    holder = {"backend": backend}
    failed: dict = {}
    if total:
        if backend is None and backend_factory is None:
            from vtoken.eval.backend import load_backend

            def backend_factory():
                return load_backend(config.model, config.device, config.dtype, config.device_map,
                                    config.max_new_tokens, memo_inputs=True, reuse_vision=config.reuse_vision)

        def get_backend():  # loaded only when a question really needs the model
            if holder["backend"] is None:
                holder["backend"] = backend_factory()
            if hasattr(holder["backend"], "warmup"):
                holder["backend"].warmup = config.warmup
            return holder["backend"]

        failed = compute_batches(work, total, get_backend, out, rank, world, config)
    elif config.progress and rank == 0:
        log_message(f"vtoken eval: nothing left to compute in {out}; writing the report")
    backend = holder["backend"]
    atomic_jsonl(out / f"failed_configs.part-{rank}.jsonl",
                 [{"method": m, "keep": k, "error": e, "rank": rank} for (m, k), e in sorted(failed.items())])

    return datasets, configs, backend


class ShardFailed(RuntimeError):
    """Another shard of this launch stopped with an error (its message is in this one's)."""


def _mark_failed(out: Path, rank: int, world: int, exc: BaseException) -> None:
    try:
        (out / f".rank-{rank}-of-{world}.{run_token()}.failed").write_text(f"{type(exc).__name__}: {exc}\n")
    except OSError:
        pass


def run_token() -> str:
    """An id shared by the processes of one launch (``accelerate launch`` / ``torchrun`` start
    every local rank from the same agent process; ``vtoken eval --shard`` processes started by
    one shell) and different between launches. ``$VTOKEN_EVAL_RUN_ID``, when set, is the id (for
    shards started through wrappers such as ``timeout``, whose parents differ)."""
    import hashlib

    if os.environ.get("VTOKEN_EVAL_RUN_ID"):
        return hashlib.sha1(os.environ["VTOKEN_EVAL_RUN_ID"].encode()).hexdigest()[:12]
    parts = [str(os.getppid()), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
             os.environ.get("TORCHELASTIC_RUN_ID", "")]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _shard_complete(out: Path, rank: int, world: int, datasets: list, configs: list) -> bool:
    """Whether rank ``rank``'s questions all have a record (an answer or an error) in the output
    folder, or belong to a (method, budget) that rank reported as unable to run."""
    skipped = {(f["method"], f["keep"]) for f in read_jsonl(out / f"failed_configs.part-{rank}.jsonl", check_failure)}
    have = {record_key(r) for r in existing_predictions(out)}
    for method, keep in configs:
        kk = keep_key(keep)
        if (method, kk) in skipped:
            continue
        for ds in datasets:
            if any((ds.name, str(ds.samples[i].id), method, kk) not in have
                   for i in range(rank, len(ds.samples), world)):
                return False
    return True


def _file_barrier(out: Path, rank: int, world: int, poll_s: float = 1.0,
                  shard_done: Optional[Callable] = None) -> None:
    """Ranks > 0 leave a marker once their part files are complete; rank 0 waits for all of them
    (no collective call, so no communication timeout however long a shard takes). With
    ``shard_done(r)``, a rank's marker counts only once its records are all there: a marker left
    by a killed earlier launch with the same run id (``--shard`` started by hand from one shell
    without ``$VTOKEN_EVAL_RUN_ID``) does not let rank 0 merge an unfinished shard."""
    import time

    token = run_token()
    mine = out / f".rank-{rank}-of-{world}.{token}.done"
    if rank != 0:
        mine.write_text("done\n")
        return
    others = {r: out / f".rank-{r}-of-{world}.{token}.done" for r in range(1, world)}
    failed = [out / f".rank-{r}-of-{world}.{token}.failed" for r in range(1, world)]
    finished: set = set()
    t0, last, last_check = time.time(), time.time(), 0.0
    while len(finished) < len(others):
        stopped = [(r, p) for r, p in zip(range(1, world), failed) if p.exists()]
        if stopped:
            why = "; ".join(f"rank {r}: {p.read_text().strip()}" for r, p in stopped)
            for _, p in stopped:
                p.unlink()
            raise ShardFailed(f"vtoken eval: shard(s) of this launch stopped, so no report is written ({why}); "
                              f"every finished batch is kept in {out}: run the same command again to resume")
        marked = [r for r, p in others.items() if r not in finished and p.exists()]
        if marked and (shard_done is None or time.time() - last_check >= 10 * poll_s):
            last_check = time.time()  # reading the part files is not free: at most every 10 polls
            finished.update(r for r in marked if shard_done is None or shard_done(r))
        if time.time() - last > 60:
            waiting = sorted(set(others) - finished)
            log_message(f"vtoken eval: rank 0 waiting for rank(s) {waiting} to finish ({time.time() - t0:.0f} s)")
            last = time.time()
        if len(finished) < len(others):
            time.sleep(poll_s)
    for p in others.values():
        p.unlink(missing_ok=True)


def _dedupe_names(datasets: list) -> None:
    seen: dict = {}
    for ds in datasets:
        if ds.name in seen:
            seen[ds.name] += 1
            ds.name = f"{ds.name}-{seen[ds.name]}"
        else:
            seen[ds.name] = 1


def _sort_key(r: dict) -> tuple:
    return (str(r.get("dataset")), str(r.get("method")), str(r.get("keep")), int(r.get("index", 0)), str(r.get("id")))


def merge_outputs(out) -> None:
    """Merge part files into ``predictions.jsonl`` / ``timings.jsonl`` (deduplicated, sorted;
    a successful prediction wins over an error record of the same key) and delete the parts."""
    out = Path(out)
    merged: dict = {}
    for r in existing_predictions(out):
        k = record_key(r)
        if k not in merged or (merged[k].get("error") is not None and r.get("error") is None):
            merged[k] = r
    times = existing_timings(out)  # read (and vetted) before either merged file is written
    atomic_jsonl(out / PRED_FILE, sorted(merged.values(), key=_sort_key))
    seen, uniq = set(), []
    for t in times:
        k = (t.get("dataset"), t.get("method"), t.get("keep"), t.get("batch"), t.get("rank"))
        if k not in seen:
            seen.add(k)
            uniq.append(t)
    uniq.sort(key=lambda t: (str(t.get("dataset")), str(t.get("method")), str(t.get("keep")),
                             int(t.get("rank", 0)), int(t.get("batch", 0))))
    atomic_jsonl(out / TIMING_FILE, uniq)
    for part in list(out.glob("predictions.part-*.jsonl")) + list(out.glob("timings.part-*.jsonl")):
        part.unlink()
