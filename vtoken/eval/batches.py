"""Computing an eval's pending batches (:func:`compute_batches`): one backend configuration per
(method, budget), images opened (an unreadable one becomes an error record), a failing batch retried
question by question, every answer scored (:func:`score_sample`), and the records appended and
flushed to this rank's part files after every batch. A (method, budget) that cannot run at all
(:class:`ConfigFailed`) is skipped and reported; the others go on. A device that runs out (memory,
a CUDA failure under load: :func:`is_device_failure`) is not the method's failure: it stops the
run with :class:`DeviceFailed`, nothing of that batch recorded, so running again resumes there."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from vtoken.eval import metrics
from vtoken.eval.config import EvalConfig
from vtoken.eval.files import open_image
from vtoken.eval.memo import ByteLRU
from vtoken.eval.records import keep_key, log_message
from vtoken.eval.samples import EvalDataset
from vtoken.errors import DeviceFailed, VTokenError

__all__ = ["compute_batches", "score_sample", "ConfigFailed", "DeviceFailed", "is_device_failure"]

#: opened images kept between batches (bytes of their pixels): the next method and budget answer a
#: batch with the same image objects, which the processor memo and the vision memo find by identity
#: (an image read from a path would otherwise be a new object every time)
OPENED_BYTES = 2 << 30


def pixel_bytes(image) -> int:
    """Bytes of an opened image's pixels (a PIL image, or a video's list of frames)."""
    if isinstance(image, (list, tuple)):
        return sum(pixel_bytes(f) for f in image)
    size = getattr(image, "size", None)
    if not (isinstance(size, tuple) and hasattr(image, "getbands")):
        return 0
    return size[0] * size[1] * len(image.getbands())


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


class ConfigFailed(Exception):
    """A (method, budget) cannot run at all (e.g. the method does not fit the model)."""


def is_device_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out or failed (memory, a CUDA error), not that the
    method cannot run: scoring it as the method's failure would put the machine's load in the table
    (e.g. many eval shards sharing one GPU). vtoken's own errors never count."""
    if isinstance(exc, VTokenError):
        return False
    from vtoken.kernels.dispatch import is_device_failure as torch_device_failure  # (torch, triton: lazily)

    return torch_device_failure(exc)


def _device_failed(exc: BaseException, method: str, kk: str, where: str) -> DeviceFailed:
    return DeviceFailed(
        f"vtoken eval: the device failed while {method} keep={kk} ran on {where} ({type(exc).__name__}: {exc}); "
        "not scored as the method's failure: nothing of this batch was recorded, and running the same command "
        "again resumes here (with fewer shards per GPU or a smaller --batch-size if memory ran out; after any "
        "other CUDA error this process's device is unusable, so the run stops)")


def _release_cached_memory() -> None:
    """Hands the CUDA allocator's cached blocks back between configurations (shards sharing a GPU
    each keep only what their current configuration uses)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def compute_batches(work, total, get_backend, out: Path, rank: int, world: int, config: EvalConfig) -> dict:
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
    state = {"ctx": None, "current": None, "backend": None, "device_name": None, "consecutive": 0,
             "opened": ByteLRU(OPENED_BYTES, size_of=pixel_bytes)}
    failed: dict = {}
    phases = _PhaseLog(rank, enabled=not config.progress)

    def leave(exc_info=(None, None, None)):
        if state["ctx"] is not None:
            ctx, state["ctx"], state["current"] = state["ctx"], None, None
            ctx.__exit__(*exc_info)
            _release_cached_memory()

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
            if is_device_failure(exc):
                raise _device_failed(exc, method, keep_key(keep), "attaching") from exc
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
            phases.start(method, kk)
            try:
                recs, timing = _run_batch(enter, state, method, keep, kk, ds, idx)
            except ConfigFailed as exc:
                leave()
                failed[(method, kk)] = str(exc)
                log_message(f"vtoken eval: {method} keep={kk} skipped: {exc}")
                recs, timing = [], None
            preds_f.write(recs)
            phases.add(timing)
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
        phases.finish()
    leave()
    return failed


class _PhaseLog:
    """Where a batch job's time goes (``--no-progress`` runs: the GPU scripts' shards), one log line
    per (method, budget): its batches, wall seconds (attach, warm-up pass, generation, scoring; the
    first one also loads the model) and the timed generation's share; at the end the totals
    against the time since the process started (imports, data loading)."""

    def __init__(self, rank: int, enabled: bool):
        self.rank, self.enabled = rank, enabled
        self.t0 = time.perf_counter()
        self.key, self.since, self.batches, self.timed = None, None, 0, 0.0
        self.total_wall = self.total_timed = 0.0

    def start(self, method, kk):
        if (method, kk) != self.key:
            self._flush()
            self.key, self.since, self.batches, self.timed = (method, kk), time.perf_counter(), 0, 0.0

    def add(self, timing):
        self.batches += 1
        self.timed += (timing or {}).get("wall_ms", 0.0) / 1e3

    def _flush(self):
        if self.key is None:
            return
        wall = time.perf_counter() - self.since
        self.total_wall += wall
        self.total_timed += self.timed
        if self.enabled:
            log_message(f"vtoken eval [rank {self.rank}] {self.key[0]}@{self.key[1]}: {self.batches} batch(es), "
                        f"{wall:.2f} s wall, {self.timed:.2f} s timed generation")

    def finish(self):
        self._flush()
        self.key = None
        if self.enabled:
            since_start = _process_age()
            log_message(f"vtoken eval [rank {self.rank}] batches: {self.total_wall:.2f} s wall, {self.total_timed:.2f} s "
                        f"timed generation; {since_start:.1f} s since the process started")


_IMPORTED = time.perf_counter()


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere: since this module's import)."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


def _run_batch(enter, state, method, keep, kk, ds: EvalDataset, idx: list):
    """One batch: open images (unreadable = error record), generate (a failing batch is retried
    question by question to isolate the culprit), score. Returns (records, timing)."""
    recs, images, ok = [], [], []
    for i in idx:
        try:
            image = state["opened"].get((ds.name, i))
            if image is None:
                image = open_image(ds.samples[i].image)
                state["opened"].put((ds.name, i), image, ())
            images.append(image)
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
            if is_device_failure(exc):
                raise _device_failed(exc, method, kk, ds.name) from exc
            first_error = exc
            failures = 0
            for j, i in enumerate(ok):
                try:
                    outputs[i] = (backend.generate([images[j]], [questions[j]]), 0) if len(ok) > 1 else None
                    if outputs[i] is None:
                        raise first_error
                    state["consecutive"] = 0
                except Exception as exc1:  # noqa: BLE001
                    if is_device_failure(exc1):
                        raise _device_failed(exc1, method, kk, ds.name) from exc1
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
