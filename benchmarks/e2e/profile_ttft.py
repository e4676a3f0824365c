"""Where batch-1 TTFT goes on ``apply_pruning(..., compile={"fused_ops": True})`` + ``generate`` (issue 23, item 2).

    python benchmarks/e2e/profile_ttft.py --out DIR [--tiny] [--methods none,fastv] [--keep 64] [--decode-batch 1,32]
                                          [--variants merged,separate,gemv,head,head-gemv]

LLaVA-1.5-7B shapes (random bf16 weights on CUDA; ``--tiny``: the bench's tiny config on the CPU, its graphs emulated, to
check the script), one image, batch 1, ``generate(max_new_tokens=1)``. Per method: the median wall
time of 15 calls after 3 warm-ups; one call under ``cProfile`` (host time per Python function:
``DIR/METHOD.cprofile.txt``); on CUDA one call under ``torch.cuda.set_sync_debug_mode`` (where the
host waits for the GPU: ``DIR/METHOD.syncs.txt``, the count in the row's ``host_waits``); one call
under ``torch.profiler`` (``DIR/METHOD.ops.txt``: ops by
self CPU time; the summed GPU kernel time, i.e. how long the GPU was busy out of the wall time).
With ``--decode-batch B[,B2...]``: per method and batch, ``generate(max_new_tokens=33,
min_new_tokens=33)`` with the token choice inside the captured step (plain greedy) and on the host
(a logits processor that changes nothing), each length and choice in its own block after a warm-up
call, medians of 3; TTFT and decode ms/token
((33-token time - TTFT) / 32); the first under ``torch.profiler`` (``DIR/METHOD.decode_bB.txt``: GPU
kernels by device time, i.e. what the 32 decode steps spend their time on). ``--variants`` runs
everything once per engine variant, in the same run: ``merged`` (the defaults of ``fused_ops``),
``separate`` (``merge_projections=False``: separate q/k/v and gate/up GEMMs; ``-nomerge`` in the file
names; ``--merge on,off`` is ``--variants merged,separate``), ``gemv`` (``gemv=True``: the batch-1 decode
step's projections as Triton GEMVs, :mod:`vtoken.kernels.gemv`; ``-gemv``), ``head`` (``graph_prefill="all"``: the
prefill's eager head captured too, one graph per prompt layout; the row's ``engine_last.head_graph`` says whether it
was replayed or why not; ``-head``), ``head-gemv`` (both). ``DIR/summary.json`` holds the numbers (each row's ``variant``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch

import vtoken
from vtoken.bench import models as M


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _profiled(fn, dev):
    """(key_averages, summed GPU kernel ms) of one ``fn()`` under ``torch.profiler``."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as tp:
        fn()
        _sync(dev)
    events = tp.key_averages()
    return events, sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1000


def _host_waits(fn, dev, path: str):
    """The number of times one ``fn()`` makes the host wait for the GPU (CUDA only, else None), and
    each call site with its count in ``path`` (:func:`vtoken.bench.host_waits.cuda_waits`)."""
    if dev.type != "cuda":
        return None
    from vtoken.bench.host_waits import cuda_waits

    with cuda_waits() as sites:
        fn()
    _sync(dev)
    with open(path, "w") as f:
        f.writelines(f"{n:4d}  {where}\n" for (_, where), n in sites.most_common())
    return sum(sites.values())


#: ``--variants``: the engine's options besides ``fused_ops`` (file-name suffix, options)
VARIANTS = {"merged": ("", {}), "separate": ("-nomerge", {"merge_projections": False}),
            "gemv": ("-gemv", {"gemv": True}), "head": ("-head", {"graph_prefill": "all"}),
            "head-gemv": ("-head-gemv", {"graph_prefill": "all", "gemv": True})}


#: the engine's graphs on the CPU (``--tiny``): the same captures, emulated (vtoken.engine.graph_emulator)
_CPU_GRAPHS = {"cuda_graph": "emulate"}


def _engine(variant: str, dev=None) -> dict:
    return {"fused_ops": True, **VARIANTS[variant][1], **(_CPU_GRAPHS if dev is not None and dev.type == "cpu" else {})}


def _suffix(variant: str) -> str:
    return VARIANTS[variant][0]


def profile_method(model, inputs, method: str, keep: int, out: str, dev, variant: str = "merged") -> dict:
    handle = vtoken.apply_pruning(model, method=method, keep=keep, compile=_engine(variant, dev))
    try:
        def gen():
            return model.generate(**inputs, max_new_tokens=1, do_sample=False)

        for _ in range(3):
            gen()
        times = []
        for _ in range(15):
            _sync(dev)
            t0 = time.perf_counter()
            gen()
            _sync(dev)
            times.append(1000 * (time.perf_counter() - t0))
        prof = cProfile.Profile()
        _sync(dev)
        prof.enable()
        gen()
        _sync(dev)
        prof.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("cumulative").print_stats(70)
        stats.sort_stats("tottime").print_stats(40)
        with open(os.path.join(out, f"{method}{_suffix(variant)}.cprofile.txt"), "w") as f:
            f.write(text.getvalue())
        events, gpu_ms = _profiled(gen, dev)
        waits = _host_waits(gen, dev, os.path.join(out, f"{method}{_suffix(variant)}.syncs.txt"))
        with open(os.path.join(out, f"{method}{_suffix(variant)}.ops.txt"), "w") as f:
            f.write(events.table(sort_by="self_cpu_time_total", row_limit=60))
            if dev.type == "cuda":
                f.write("\n\n" + events.table(sort_by="self_device_time_total", row_limit=40))
        n_ops = sum(e.count for e in events)
        last = dict(model.generate.route.decoder.last) if hasattr(model.generate, "route") else {}
        return dict(method=method, keep=keep, ttft_ms_median=statistics.median(times),
                    ttft_ms_min=min(times), ttft_ms_max=max(times), gpu_busy_ms=gpu_ms,
                    profiler_op_calls=n_ops, host_waits=waits, engine_last={k: v for k, v in last.items()
                                                          if isinstance(v, (int, float, str, bool, type(None)))})
    finally:
        handle.remove()


class _Identity:
    """A logits processor that changes nothing: it makes ``generate`` choose tokens on the host."""

    def __call__(self, input_ids, scores):
        return scores


def profile_decode(model, batch_inputs, method: str, keep: int, out: str, dev, new_tokens: int = 33,
                   variant: str = "merged") -> list:
    """Two rows: the token choice inside the captured step (plain greedy) and on the host (the same
    call with a logits processor that changes nothing), timed alternately in one run."""
    from transformers.generation import LogitsProcessorList

    handle = vtoken.apply_pruning(model, method=method, keep=keep, compile=_engine(variant, dev))
    rows = []
    try:
        variants = {"graph": {}, "host": {"logits_processor": LogitsProcessorList([_Identity()])}}

        def gen(n, choice):
            return model.generate(**batch_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  **variants[choice])

        # each (choice, length) timed in a block after a warm-up call of its own (session 15's first
        # decode rows alternated them and timed graph captures; the engine now keeps its session for
        # shorter calls and both token choices, but the blocks keep the rows independent of that)
        times = {}
        for choice in variants:
            for n in (new_tokens, 1):
                gen(n, choice)
                for _ in range(3):
                    _sync(dev)
                    t0 = time.perf_counter()
                    gen(n, choice)
                    _sync(dev)
                    times.setdefault((choice, n), []).append(1000 * (time.perf_counter() - t0))
        gen(new_tokens, "graph")
        events, gpu_ms = _profiled(lambda: gen(new_tokens, "graph"), dev)
        batch = batch_inputs["input_ids"].shape[0]
        with open(os.path.join(out, f"{method}{_suffix(variant)}.decode_b{batch}.txt"), "w") as f:
            key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            f.write(events.table(sort_by=key, row_limit=50))
        for choice in variants:
            ttft, total = statistics.median(times[(choice, 1)]), statistics.median(times[(choice, new_tokens)])
            rows.append(dict(method=method, keep=keep, batch=batch, token_choice=choice, variant=variant,
                             ttft_ms=ttft, total_ms=total,
                             decode_ms_per_token=(total - ttft) / (new_tokens - 1),
                             gpu_busy_ms_profiled_call=gpu_ms if choice == "graph" else None))
        return rows
    finally:
        handle.remove()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--methods", default="none,fastv")
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--decode-batch", default="", help="comma-separated batch sizes")
    p.add_argument("--merge", default=None, help="on, off or on,off: as --variants merged / separate")
    p.add_argument("--variants", default="merged", help=f"comma-separated among {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    if args.merge:
        args.variants = ",".join({"on": "merged", "off": "separate"}[m] for m in args.merge.split(","))
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}")
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    model = M.build_llava(args.tiny, dev, dtype)
    inputs = M.llava_inputs(model, 1, device=dev, dtype=dtype)
    rows = []
    for variant in variants:
        for method in args.methods.split(","):
            row = dict(profile_method(model, inputs, method, args.keep, args.out, dev, variant), variant=variant)
            print(json.dumps(row), flush=True)
            rows.append(row)
    for batch in [int(b) for b in args.decode_batch.split(",") if b]:
        big = M.llava_inputs(model, batch, device=dev, dtype=dtype)
        for variant in variants:
            for method in args.methods.split(","):
                for row in profile_decode(model, big, method, args.keep, args.out, dev, variant=variant):
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
