"""Suite ``maxbatch``: the largest batch that fits in 60 GiB, LLaVA-1.5-7B, 64 new tokens.

The process is capped with ``torch.cuda.set_per_process_memory_fraction(60 GiB / total)`` (the
caching allocator raises ``torch.cuda.OutOfMemoryError`` past it; the model's own weights count).
A probe is ``model.generate(max_new_tokens=64, min_new_tokens=64)`` on a batch of single-image
prompts (576 image + 64 text tokens each); it fits when it finishes without running out of
memory. Search with few probes: two small calibration batches give the reserved memory per
sample, a linear prediction gives the first guess near the limit, then the bracket
[largest fit, smallest OOM] is narrowed by bisection until its width is within ``tol`` of the
lower end (or the probe / time budget is spent). Rows report the bracket, every probe, and the
throughput (new tokens / s, one timed ``generate``, prefill included) at the largest fitting batch.

``--tiny`` (CPU): the cap is simulated: a probe "runs out of memory" when weights + batch x the
measured per-sample KV-cache bytes exceed a cap sized for a dozen unpruned samples.
"""

from __future__ import annotations

import time

import torch

import vtoken
from vtoken.bench import models as M
from vtoken.bench.common import cache_of, kv_bytes, unlink

CAP_GIB = 60.0
HARD_MAX = 1024  # keeps batch x heads of every launch grid far below CUDA's 65535 limit on a grid axis

_OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")


def is_oom(exc: BaseException) -> bool:
    """Out of device memory, whichever library noticed it first (the caching allocator raises
    ``torch.cuda.OutOfMemoryError``; cuBLAS / cuDNN workspace failures arrive as RuntimeError)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc)
    return any(m in msg for m in _OOM_MARKERS)


def search_max_batch(fits, *, start=8, predict=None, tol=0.05, max_probes=8, hard_max=4096, time_ok=lambda: True):
    """Largest ``b`` with ``fits(b)`` true, assuming monotonicity, in few probes.

    fits(b) -> (ok: bool, info: dict). Calibration probes ``start`` (halved until it fits) and
    ``2 * start``; then ``predict(probes) -> int | None`` proposes a guess near the limit; without
    a bracket the search grows by doubling (by ``1 + 3 * tol`` right after a guess that fit), then
    bisects [lo, hi] until ``hi - lo <= max(1, tol * lo)``. Stops early when ``max_probes`` are
    spent or ``time_ok()`` is false. Returns (lo, hi, probes): lo = largest batch that fit (0 if
    none), hi = smallest that did not (None if never hit), probes = [(batch, ok, info)] in order.
    """
    probes = []
    state = {"lo": 0, "hi": None}

    def probe(b):
        ok, info = fits(b)
        probes.append((b, ok, info))
        if ok:
            state["lo"] = max(state["lo"], b)
        else:
            state["hi"] = b if state["hi"] is None else min(state["hi"], b)
        return ok

    def done():
        return len(probes) >= max_probes or not time_ok()

    b = start
    while not probe(b):
        if b == 1 or done():
            return state["lo"], state["hi"], probes
        b = max(1, b // 2)
    if not done() and min(2 * b, hard_max) > b and (state["hi"] is None or 2 * b < state["hi"]):
        probe(min(2 * b, hard_max))
    guess = predict(probes) if (predict is not None and state["hi"] is None) else None
    growth = 2.0
    guess_failed = False
    while not done():
        lo, hi = state["lo"], state["hi"]
        if hi is not None and hi - lo <= max(1, int(tol * lo)):
            break
        if hi is None:
            if lo >= hard_max:
                break
            if guess is not None and guess > lo:
                nxt, guess, used_guess = guess, None, True
            else:
                nxt, used_guess = int(lo * growth), False
            nxt = min(max(nxt, lo + 1), hard_max)
            ok = probe(nxt)
            if used_guess:
                growth = 1.0 + 3.0 * tol
                guess_failed = not ok
        elif guess_failed and lo < hi * (1.0 - 4.0 * tol):
            # the guess overshot (it is a linear fit): step down from it by 2 tol until a batch fits,
            # then bisect the narrow bracket (bisecting from the small calibration batch costs more)
            guess_failed = not probe(max(lo + 1, int(hi * (1.0 - 2.0 * tol))))
        else:
            probe((lo + hi) // 2)
    return state["lo"], state["hi"], probes


def _linear_predict(cap_bytes, margin=0.97):
    """First guess from the calibration probes: batch where reserved memory reaches the cap."""

    def predict(probes):
        pts = [(b, info["reserved"]) for b, ok, info in probes if ok and info.get("reserved")]
        if len(pts) < 2:
            return None
        (b0, m0), (b1, m1) = pts[-2], pts[-1]
        if b1 == b0 or m1 <= m0:
            return None
        slope = (m1 - m0) / (b1 - b0)
        return int(b1 + margin * (cap_bytes - m1) / slope)

    return predict


def run_maxbatch(bench, pool, keep=64, new_tokens=64, cap_gib=CAP_GIB, method="fastv", tol=0.05, max_probes=7):
    suite = "maxbatch"
    pool.release_all_but("llava-1.5-7b")
    model = pool.get("llava-1.5-7b")
    bench.empty_cache(collect=True)
    vc = model.config.vision_config
    per = (vc.image_size // vc.patch_size) ** 2
    if bench.tiny:
        keep = max(1, round(keep * per / 576))
    T = new_tokens
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if bench.cuda:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        cap = int(cap_gib * 2**30)
        fraction = min(1.0, cap / total)
    else:
        total, cap, fraction = None, None, None
    results = {}
    sim = {}

    def make_fits(name, handle):
        def fits(batch):
            info = dict(batch=batch)
            ok = True
            inputs = None
            t0 = time.perf_counter()
            try:
                inputs = M.llava_inputs(model, batch, device=bench.device, dtype=bench.dtype)
                bench.reset_peak()
                with torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=T, min_new_tokens=T, do_sample=False,
                                         return_dict_in_generate=True)
                bench.sync()
                info["seconds"] = round(time.perf_counter() - t0, 2)
                info["new_tokens"] = int(out.sequences.shape[1] - inputs["input_ids"].shape[1])
                unlink(out)
                del out
                if bench.cuda:
                    info["reserved"] = torch.cuda.max_memory_reserved()
                    info["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                else:  # simulated cap
                    info["reserved"] = weights + batch * sim[name]
                    if info["reserved"] > sim["cap"]:
                        raise torch.cuda.OutOfMemoryError("simulated: over the tiny cap")
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not is_oom(exc):
                    raise
                ok = False
                info["seconds"] = round(time.perf_counter() - t0, 2)
                info["error"] = type(exc).__name__
            inputs = None
            bench.empty_cache(collect=True)  # frames of a failed probe / a pruned cache may sit in reference cycles
            if bench.cuda:
                torch.cuda.reset_peak_memory_stats()
            bench.log(f"maxbatch probe {name} batch {batch}: {'fits' if ok else 'OOM'} ({info['seconds']} s)")
            return ok, info

        return fits

    def prefill_kv():
        """KV-cache bytes of one prompt after the prefill (with whatever pruning is attached)."""
        inputs = M.llava_inputs(model, 1, device=bench.device, dtype=bench.dtype)
        with torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        return kv_bytes(cache_of(out)), inputs["input_ids"].shape[1]

    if not bench.cuda:  # simulated cap: weights + batch x (prefill KV + T decode tokens in every layer)
        n_full, ctx = prefill_kv()
        grow = int(T * n_full / ctx)
        sim["unpruned"] = n_full + grow
        sim["cap"] = weights + int(12.5 * sim["unpruned"])

    try:
        if bench.cuda:
            torch.cuda.set_per_process_memory_fraction(fraction)
        for name in ("unpruned", f"{method}[{bench.backend}]"):
            if bench.over_budget(10):
                bench.skip(suite, name)
                continue
            handle = None
            if name != "unpruned":
                handle = vtoken.apply_pruning(model, method=method, keep=keep, backend=bench.backend)
            try:
                if not bench.cuda and name != "unpruned":
                    sim[name] = prefill_kv()[0] + grow
                predict = _linear_predict(cap) if bench.cuda else _linear_predict(sim["cap"])
                start = 8 if bench.cuda else 2
                lo, hi, probes = search_max_batch(make_fits(name, handle), start=start, predict=predict, tol=tol,
                                                  max_probes=max_probes, hard_max=HARD_MAX,
                                                  time_ok=lambda: not bench.over_budget(15))
                tput = None
                best = [info for b, ok, info in probes if ok and b == lo]
                if best and best[0].get("seconds"):
                    tput = round(lo * T / best[0]["seconds"], 1)
            finally:
                if handle is not None:
                    handle.remove()
            results[name] = bench.add(
                suite=suite, model="llava-1.5-7b", method=name, keep="all" if name == "unpruned" else keep,
                max_batch=lo, first_oom_batch=hi, resolution=None if hi is None else round((hi - lo) / max(lo, 1), 3),
                new_tokens=T, context=576 + 64, cap_gib=cap_gib if bench.cuda else None,
                cap_fraction=None if fraction is None else round(fraction, 4),
                weights_gb=round(weights / 2**30, 2), gen_tokens_per_s_at_max=tput,
                probes=[dict(batch=b, fits=ok, seconds=info.get("seconds"), peak_gb=info.get("peak_gb"))
                        for b, ok, info in probes],
                simulated_cap=None if bench.cuda else True)
    finally:
        if bench.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
        bench.empty_cache()
    names = list(results)
    if len(names) == 2 and results[names[0]]["max_batch"]:
        results[names[1]]["max_batch_vs_unpruned"] = round(results[names[1]]["max_batch"] / results[names[0]]["max_batch"], 2)
    return results
