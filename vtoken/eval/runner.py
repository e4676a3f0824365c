"""The eval loop: every (method, budget) on every data set, resumable, sharded, reported.

Files in the output directory:

* ``predictions.jsonl`` — one line per (dataset, id, method, keep): prediction, answers, score,
  visual tokens; the source of every number in the table.
* ``timings.jsonl`` — one line per generated batch (prefill ms, decode ms/token, peak memory, KV).
* ``run_config.json`` — what the predictions depend on (model, dtype, max_new_tokens); a re-run
  with the same ``--out`` must match it.
* ``table.md``, ``table.csv``, ``results.json``, ``plot.png`` — written by :func:`write_report`.
* while running: ``predictions.part-<rank>.jsonl`` / ``timings.part-<rank>.jsonl``, appended
  and flushed after every batch, merged into the files above at the end.

Resuming: every existing prediction line (merged file and part files) marks its
(dataset, id, method, keep) done; only the rest is computed. Batches are fixed slices of each
rank's shard, so a resumed batch holds the same questions as in a one-shot run.

Sharding: rank r of w takes questions ``r, r + w, r + 2w, ...`` of every data set
(``accelerate launch`` sets rank and world size; :func:`run_eval` takes them as arguments too);
after a barrier rank 0 merges the part files and writes the report.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from vtoken.errors import DataFormatError
from vtoken.eval import metrics
from vtoken.eval.loaders import EvalDataset, json_kind, load_dataset, open_image

__all__ = ["EvalConfig", "run_eval", "merge_outputs", "keep_key", "parse_keep", "read_jsonl", "read_predictions",
           "check_prediction", "score_sample", "DEFAULT_METHODS", "QUICK_METHODS", "BUDGET_COUNTS"]

#: methods when --methods is not given, in table order (those registered are used)
DEFAULT_METHODS = ("fastv", "sparsevlm", "pyramiddrop", "visionzip", "divprune", "dart", "random")
#: methods of the no-argument quick run: one per family that runs on any adapter, plus the baseline
QUICK_METHODS = ("fastv", "visionzip", "divprune", "random")
#: the token counts a table's budget blocks can use (:attr:`EvalConfig.budget_count`)
BUDGET_COUNTS = ("final", "equivalent")
PRED_FILE, TIMING_FILE, CONFIG_FILE = "predictions.jsonl", "timings.jsonl", "run_config.json"
#: keys every prediction record has (its identity)
PRED_KEYS = ("dataset", "id", "method", "keep")


@dataclass
class EvalConfig:
    model: str = "vtoken/tiny-llava"
    data: list = field(default_factory=lambda: ["synthetic", "easy-vqa"])
    methods: list = field(default_factory=list)
    keeps: list = field(default_factory=lambda: [0.333, 0.222, 0.111])
    limit: Optional[int] = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    device_map: Optional[str] = None
    out: str = "eval_out"
    max_new_tokens: int = 16
    seed: int = 0
    progress: bool = True
    #: which visual-token count the "Retain N" blocks of the table mean: "final" = tokens kept
    #: after the last stage, "equivalent" = layer-averaged tokens (docs/DESIGN.md §4). A preset that
    #: can count its budget either way (SparseVLM) runs at N by this count, so it is part of the run's
    #: identity; a row that still does not keep N by it is flagged
    budget_count: str = "final"

    def run_identity(self) -> dict:
        """What predictions depend on; a resumed run must match it."""
        return {"model": self.model, "dtype": self.dtype, "max_new_tokens": self.max_new_tokens,
                "budget_count": self.budget_count}


def keep_key(keep) -> str:
    """Canonical string of a budget: ``"full"`` (upper bound), ``"192"`` or ``"0.333"``."""
    if keep is None:
        return "full"
    if isinstance(keep, int):
        return str(keep)
    return f"{float(keep):.6g}"


def parse_keep(text: str):
    """``"192"`` -> 192, ``"0.333"`` -> 0.333, ``"full"`` -> None."""
    t = str(text).strip()
    if t == "full":
        return None
    try:
        return int(t)
    except ValueError:
        return float(t)


def read_jsonl(path, check: Optional[Callable] = None, skipped: Optional[list] = None) -> list:
    """Records of a JSONL file. A line that is not JSON (the half-written last line of a killed
    run, even one cut inside a UTF-8 character) is skipped (its number appended to ``skipped``);
    ``check(record, path, line_number)`` vets every decoded line and raises on one it cannot use."""
    out = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    if skipped is not None:
                        skipped.append(n)
                    continue
                if check is not None:
                    check(rec, path, n)
                out.append(rec)
    except FileNotFoundError:
        pass
    return out


def _untouched(path) -> str:
    return f"; fix or delete that line and run again (nothing in {Path(path).parent} was changed)"


def _check_object(rec, path, n, what: str = "record", required=()) -> None:
    if not isinstance(rec, dict):
        raise DataFormatError(f"{path}, line {n}: expected a JSON object (one {what} per line), got "
                              f"{json_kind(rec)}{_untouched(path)}")
    missing = [k for k in required if k not in rec]
    if missing:
        raise DataFormatError(f"{path}, line {n}: the {what} lacks {', '.join(repr(k) for k in missing)} "
                              f"(keys: {', '.join(sorted(map(str, rec))) or 'none'}){_untouched(path)}")


def check_prediction(rec, path, n) -> None:
    """Raise :class:`DataFormatError` (file, line) unless ``rec`` is a prediction record this
    runner wrote: dataset / id / method / keep, and prediction / answers / score unless it is an
    error record."""
    _check_object(rec, path, n, "prediction record", PRED_KEYS)
    ok = rec.get("error") is not None
    if not ok:
        _check_object(rec, path, n, "prediction record", PRED_KEYS + ("prediction", "answers", "score"))
    bad = [k for k in ("dataset", "method", "keep") if not isinstance(rec[k], str)]
    if isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int)):
        bad.append("id")
    if not ok and not isinstance(rec["answers"], list):
        bad.append("answers")
    if not ok and (isinstance(rec["score"], bool) or not isinstance(rec["score"], (int, float))):
        bad.append("score")
    if bad:
        got = ", ".join(f"{k}={rec[k]!r}" for k in bad)
        raise DataFormatError(f"{path}, line {n}: the prediction record has a field of the wrong type ({got}; "
                              f"expected strings for dataset/method/keep, a string or int id, a list of answers, "
                              f"a number score){_untouched(path)}")


def _check_timing(rec, path, n) -> None:
    _check_object(rec, path, n, "timing record")


def _check_failure(rec, path, n) -> None:
    _check_object(rec, path, n, "failure record", ("method", "keep", "error"))


def _key(rec) -> tuple:
    return (rec["dataset"], str(rec["id"]), rec["method"], rec["keep"])


def score_sample(metric: str, prediction: str, answers: list, choices=None) -> float:
    """Per-question score in [0, 1] under a data set's metric (POPE / MME: right yes/no)."""
    if metric == "vqa":
        return metrics.vqa_accuracy(prediction, answers)
    if metric == "exact":
        return metrics.exact_match(prediction, answers)
    if metric == "pope":
        return float(metrics.pope_answer(prediction) == str(answers[0]).lower())
    if metric == "mme":
        return float(metrics.mme_answer(prediction) == str(answers[0]).lower())
    if metric == "mc":
        n = len(choices) if choices else 26
        return float(metrics.parse_choice(prediction, n, choices) == ord(str(answers[0]).upper()) - ord("A"))
    raise ValueError(f"unknown metric {metric!r}")


def run_configs(methods: list, keeps: list) -> list:
    """(method, keep) pairs: the upper bound first, then one block per budget."""
    out = [("none", None)]
    for k in keeps:
        for m in methods:
            if m != "none":
                out.append((m, k))
    return out


class _Appender:
    """Append JSON lines to a part file, flushing after each batch (a killed run loses at most
    the batch in flight)."""

    def __init__(self, path: Path):
        self.path = path
        needs_newline = False
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self.f = open(path, "a", encoding="utf-8")
        if needs_newline:
            self.f.write("\n")

    def write(self, recs: list):
        for r in recs:
            self.f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def read_predictions(path, log: bool = False) -> list:
    """Prediction records of ``path`` (see :func:`check_prediction`); a record it cannot use
    raises :class:`DataFormatError` naming the file and line, before anything is written."""
    skipped: list = []
    recs = read_jsonl(path, check_prediction, skipped)
    if skipped and log:
        _log(f"vtoken eval: {path}: skipped {len(skipped)} line(s) that are not JSON (a run killed while writing): "
             f"line {', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''}; "
             "their questions are computed again")
    return recs


def _existing_predictions(out: Path, log: bool = False) -> list:
    recs = read_predictions(out / PRED_FILE, log)
    for part in sorted(out.glob("predictions.part-*.jsonl")):
        recs.extend(read_predictions(part, log))
    return recs


def _existing_timings(out: Path) -> list:
    times = read_jsonl(out / TIMING_FILE, _check_timing)
    for part in sorted(out.glob("timings.part-*.jsonl")):
        times.extend(read_jsonl(part, _check_timing))
    return times


def _check_identity(out: Path, config: EvalConfig, rank: int) -> None:
    path = out / CONFIG_FILE
    ident = config.run_identity()
    if path.exists():
        try:
            old = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):  # e.g. emptied by a kill while it was written
            _log(f"vtoken eval: {path} is not readable JSON (a run killed while writing it?); "
                 f"it is written again for {ident}")
            old = None
            if rank == 0:
                _atomic_text(path, json.dumps(ident, indent=2, sort_keys=True))
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
        _atomic_text(path, json.dumps(ident, indent=2, sort_keys=True))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    if config.budget_count not in BUDGET_COUNTS:
        raise ValueError(f"budget_count must be one of {BUDGET_COUNTS}; got {config.budget_count!r}")
    out.mkdir(parents=True, exist_ok=True)
    # everything already written is read (and vetted) before anything is written: a file this
    # run cannot use stops it with the file and line, and leaves the directory as it was
    existing = _existing_predictions(out, log=config.progress)
    _existing_timings(out)
    _check_identity(out, config, rank)
    if datasets is None:
        datasets = [load_dataset(spec, config.limit, config.seed) for spec in config.data]
    _dedupe_names(datasets)
    configs = run_configs(config.methods, config.keeps)

    done = {_key(r) for r in existing if r.get("error") is None}
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
                                    config.max_new_tokens)

        def get_backend():  # loaded only when a question really needs the model
            if holder["backend"] is None:
                holder["backend"] = backend_factory()
            return holder["backend"]

        failed = _compute(work, total, get_backend, out, rank, world, config)
    elif config.progress and rank == 0:
        _log(f"vtoken eval: nothing left to compute in {out}; writing the report")
    backend = holder["backend"]
    _atomic_jsonl(out / f"failed_configs.part-{rank}.jsonl",
                  [{"method": m, "keep": k, "error": e, "rank": rank} for (m, k), e in sorted(failed.items())])

    if barrier is not None:
        barrier()
    elif world > 1:
        _file_barrier(out, rank, world)
    if rank != 0 or not report:
        return None
    merge_outputs(out)
    from vtoken.eval.table import write_report

    info = dict(getattr(backend, "info", {}) or {}) if backend is not None else {}
    failures = []
    for r in range(world):
        failures += read_jsonl(out / f"failed_configs.part-{r}.jsonl", _check_failure)
    for part in out.glob("failed_configs.part-*.jsonl"):
        part.unlink()
    return write_report(out, config, datasets, configs, backend_info=info, failed_configs=failures)


def run_token() -> str:
    """An id shared by the processes of one launch (``accelerate launch`` / ``torchrun`` start
    every local rank from the same agent process) and different between launches."""
    import hashlib

    parts = [str(os.getppid()), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
             os.environ.get("TORCHELASTIC_RUN_ID", "")]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _file_barrier(out: Path, rank: int, world: int, poll_s: float = 1.0) -> None:
    """Ranks > 0 leave a marker once their part files are complete; rank 0 waits for all of them
    (no collective call, so no communication timeout however long a shard takes)."""
    import time

    token = run_token()
    mine = out / f".rank-{rank}-of-{world}.{token}.done"
    if rank != 0:
        mine.write_text("done\n")
        return
    others = [out / f".rank-{r}-of-{world}.{token}.done" for r in range(1, world)]
    t0, last = time.time(), time.time()
    while not all(p.exists() for p in others):
        if time.time() - last > 60:
            waiting = [r for r, p in zip(range(1, world), others) if not p.exists()]
            _log(f"vtoken eval: rank 0 waiting for rank(s) {waiting} to finish ({time.time() - t0:.0f} s)")
            last = time.time()
        time.sleep(poll_s)
    for p in others:
        p.unlink()


def _dedupe_names(datasets: list) -> None:
    seen: dict = {}
    for ds in datasets:
        if ds.name in seen:
            seen[ds.name] += 1
            ds.name = f"{ds.name}-{seen[ds.name]}"
        else:
            seen[ds.name] = 1


class ConfigFailed(Exception):
    """A (method, budget) cannot run at all (e.g. the method does not fit the model)."""


def _compute(work, total, get_backend, out: Path, rank: int, world: int, config: EvalConfig) -> dict:
    """Run the pending batches; returns {(method, keep_key): error} for configurations that could
    not run (they are skipped and reported; the others go on)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    preds_f = _Appender(out / f"predictions.part-{rank}.jsonl")
    times_f = _Appender(out / f"timings.part-{rank}.jsonl")
    bar = None
    if tqdm is not None:
        bar = tqdm(total=total, disable=not config.progress, unit="q", dynamic_ncols=True,
                   desc=f"eval[{rank}/{world}]" if world > 1 else "eval", position=rank if world > 1 else None)
    state = {"ctx": None, "current": None, "backend": None, "device_name": None, "consecutive": 0}
    failed: dict = {}

    def leave(exc_info=(None, None, None)):
        if state["ctx"] is not None:
            ctx, state["ctx"], state["current"] = state["ctx"], None, None
            ctx.__exit__(*exc_info)

    def enter(method, keep):
        if state["current"] == (method, keep):
            return state["backend"]
        leave()
        backend = state["backend"] = get_backend()
        state["device_name"] = (getattr(backend, "info", None) or {}).get("device_name")
        ctx = backend.configure(method, keep, budget_count=config.budget_count)
        try:
            ctx.__enter__()
        except Exception as exc:  # noqa: BLE001 - e.g. PruningConfigError: this method cannot run here
            raise ConfigFailed(f"{type(exc).__name__}: {exc}") from exc
        state["ctx"], state["current"] = ctx, (method, keep)
        state["consecutive"] = 0
        return backend

    try:
        for method, keep, ds, batch_no, idx in work:
            kk = keep_key(keep)
            if (method, kk) in failed:
                if bar is not None:
                    bar.update(len(idx))
                continue
            if bar is not None:
                bar.set_postfix_str(f"{method}@{kk} {ds.name}", refresh=False)
            try:
                recs, timing = _run_batch(enter, state, method, keep, kk, ds, idx)
            except ConfigFailed as exc:
                leave()
                failed[(method, kk)] = str(exc)
                _log(f"vtoken eval: {method} keep={kk} skipped: {exc}")
                recs, timing = [], None
            preds_f.write(recs)
            if timing:
                times_f.write([dict(timing, method=method, keep=kk, dataset=ds.name, batch=batch_no, rank=rank,
                                    device_name=state["device_name"])])
            if bar is not None:
                bar.update(len(idx))
    except BaseException:
        leave(sys.exc_info())
        raise
    finally:
        preds_f.close()
        times_f.close()
        if bar is not None:
            bar.close()
    leave()
    return failed


def _run_batch(enter, state, method, keep, kk, ds: EvalDataset, idx: list):
    """One batch: open images (unreadable = error record), generate (a failing batch is retried
    question by question to isolate the culprit), score. Returns (records, timing)."""
    recs, images, ok = [], [], []
    for i in idx:
        try:
            images.append(open_image(ds.samples[i].image))
            ok.append(i)
        except Exception as exc:  # noqa: BLE001 - any unreadable image is counted, not fatal
            recs.append(_error_record(ds, i, method, kk, f"unreadable image: {type(exc).__name__}: {exc}"))
    outputs, timing = {}, None
    if ok:
        backend = enter(method, keep)
        questions = [ds.samples[i].question for i in ok]
        try:
            res = backend.generate(images, questions)
            outputs = {i: (res, j) for j, i in enumerate(ok)}
            timing = res.timing
            state["consecutive"] = 0
        except Exception as exc:  # noqa: BLE001
            first_error = exc
            failures = 0
            for j, i in enumerate(ok):
                try:
                    outputs[i] = (backend.generate([images[j]], [questions[j]]), 0) if len(ok) > 1 else None
                    if outputs[i] is None:
                        raise first_error
                    state["consecutive"] = 0
                except Exception as exc1:  # noqa: BLE001
                    outputs.pop(i, None)
                    failures += 1
                    state["consecutive"] += 1
                    if (failures == len(ok) and len(ok) > 1) or state["consecutive"] >= 8:
                        raise ConfigFailed(f"generation fails for every question on {ds.name}: "
                                           f"{type(exc1).__name__}: {exc1}") from exc1
                    recs.append(_error_record(ds, i, method, kk, f"generation failed: {type(exc1).__name__}: {exc1}"))
    for i in ok:
        if i not in outputs:
            continue
        res, j = outputs[i]
        s = ds.samples[i]
        pred = res.predictions[j]
        rec = {
            "dataset": ds.name, "id": s.id, "index": i, "method": method, "keep": kk,
            "prediction": pred, "answers": list(s.answers),
            "score": score_sample(ds.metric, pred, s.answers, s.choices),
            "qtype": s.qtype, "visual_tokens": res.visual_tokens[j], "kept_tokens": res.kept_tokens[j],
            "equivalent_tokens": res.equivalent_tokens[j],
        }
        for name in ("kept_per_stage", "stage_layers", "segment_tokens"):  # the handle's stats, per question
            values = getattr(res, name, None)
            if values is not None and values[j] is not None:
                rec[name] = list(values[j])
        if s.group:
            rec["group"] = s.group
        if s.choices is not None:
            rec["choices"] = list(s.choices)
        recs.append(rec)
    recs.sort(key=lambda r: r["index"])
    return recs, timing


def _error_record(ds: EvalDataset, i: int, method: str, kk: str, error: str) -> dict:
    return {"dataset": ds.name, "id": ds.samples[i].id, "index": i, "method": method, "keep": kk,
            "prediction": None, "answers": list(ds.samples[i].answers), "score": None, "error": error}


def _sort_key(r: dict) -> tuple:
    return (str(r.get("dataset")), str(r.get("method")), str(r.get("keep")), int(r.get("index", 0)), str(r.get("id")))


def merge_outputs(out) -> None:
    """Merge part files into ``predictions.jsonl`` / ``timings.jsonl`` (deduplicated, sorted;
    a successful prediction wins over an error record of the same key) and delete the parts."""
    out = Path(out)
    merged: dict = {}
    for r in _existing_predictions(out):
        k = _key(r)
        if k not in merged or (merged[k].get("error") is not None and r.get("error") is None):
            merged[k] = r
    times = _existing_timings(out)  # read (and vetted) before either merged file is written
    _atomic_jsonl(out / PRED_FILE, sorted(merged.values(), key=_sort_key))
    seen, uniq = set(), []
    for t in times:
        k = (t.get("dataset"), t.get("method"), t.get("keep"), t.get("batch"), t.get("rank"))
        if k not in seen:
            seen.add(k)
            uniq.append(t)
    uniq.sort(key=lambda t: (str(t.get("dataset")), str(t.get("method")), str(t.get("keep")),
                             int(t.get("rank", 0)), int(t.get("batch", 0))))
    _atomic_jsonl(out / TIMING_FILE, uniq)
    for part in list(out.glob("predictions.part-*.jsonl")) + list(out.glob("timings.part-*.jsonl")):
        part.unlink()


def _atomic_jsonl(path: Path, recs: list) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def config_dict(config: EvalConfig) -> dict:
    d = asdict(config)
    d["keeps"] = [keep_key(k) for k in config.keeps]
    return d
