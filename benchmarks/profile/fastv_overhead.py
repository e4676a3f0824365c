"""Where the pruned prefill's time goes beyond the oracle's (LLaVA-1.5-7B, fastv keep 64, batch 1).

    OUT=dir python benchmarks/profile/fastv_overhead.py   # CUDA; from outside the repository root

Prints (and writes to $OUT/fastv_overhead.txt): TTFT medians (unpruned / fastv / oracle), the
wall time of each vtoken runtime region measured with a device sync around it, the count of
device syncs (``cudaStreamSynchronize`` / ``cudaMemcpy`` D2H) and kernel launches of each path,
and the profiler's top operators of the pruned prefill.
"""
import collections, functools, os, statistics, sys, time

import torch

import vtoken
from vtoken.bench import models as M
from vtoken.bench.common import OracleFeed, kept_positions
from vtoken.hooks import runtime as R

OUT = os.environ.get("OUT", "/tmp")
B = int(os.environ.get("BATCH", "1"))
lines = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    lines.append(s)


model = M.build_llava(False, "cuda", torch.bfloat16)
inputs = M.llava_inputs(model, B, device="cuda", dtype=torch.bfloat16)
lm = model.model.language_model
N = inputs["input_ids"].shape[1]


def pre():
    with torch.no_grad():
        return model(**inputs, logits_to_keep=1, use_cache=True)


def med(fn, n=15):
    fn(); fn()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
        ts.append(1000 * (time.perf_counter() - t0))
    return statistics.median(ts)


def launches(fn):
    from torch.profiler import ProfilerActivity, profile
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn(); torch.cuda.synchronize()
    c = collections.Counter()
    for e in p.events():
        if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"):
            c["launch"] += 1
        elif e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize"):
            c["sync"] += 1
        elif e.name in ("cudaMemcpyAsync", "cudaMemcpy"):
            c["memcpy"] += 1
    return dict(c), p


regions = collections.defaultdict(list)


def timed_region(cls, name):
    f = getattr(cls, name)

    @functools.wraps(f)
    def g(*a, **k):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            torch.cuda.synchronize(); regions[name].append(1000 * (time.perf_counter() - t0))
    return g, f


for _ in range(3):
    base = med(pre)
    with vtoken.apply_pruning(model, method="fastv", keep=64) as h:
        pruned = med(pre)
        idx = kept_positions(h)
    with OracleFeed(lm, idx, N):
        oracle = med(pre)
    log(f"batch {B}: TTFT unpruned {base:.2f} ms, fastv-64 {pruned:.2f} ms, oracle {oracle:.2f} ms, "
        f"ratio {pruned / oracle:.3f}")

with vtoken.apply_pruning(model, method="fastv", keep=64) as h:
    cp, prof = launches(pre)
    idx = kept_positions(h)
    log("pruned launches/syncs/memcpy:", cp)
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35))
    saved = {}
    for name in ["on_text_call", "on_layer", "_run_stage", "_relayout", "_fill_signals", "on_multimodal_call",
                 "on_multimodal_done"]:
        g, f = timed_region(R.Runtime, name)
        saved[name] = f
        setattr(R.Runtime, name, g)
    for _ in range(5):
        pre()
    for name, f in saved.items():
        setattr(R.Runtime, name, f)
    for name, ts in regions.items():
        log(f"region {name}: calls/prefill {len(ts) // 5}, total ms/prefill {sum(ts) / 5:.3f}")
with OracleFeed(lm, idx, N):
    co, _ = launches(pre)
    log("oracle launches/syncs/memcpy:", co)
cu, _ = launches(pre)
log("unpruned launches/syncs/memcpy:", cu)
open(os.path.join(OUT, "fastv_overhead.txt"), "w").write("\n".join(lines) + "\n")
