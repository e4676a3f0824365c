"""Where the pruned prefill's time goes beyond the oracle's (LLaVA-1.5-7B, fastv keep 64, batch 1).

    OUT=dir python benchmarks/profile/fastv_overhead.py   # CUDA; from outside the repository root

Prints (and writes to $OUT/fastv_overhead.txt): TTFT medians of unpruned / fastv / oracle from
interleaved rounds with the paired fastv/oracle ratio (as the bench computes it), the time of
each vtoken runtime region (wall time with a device sync around it, and host time alone), the
count of device syncs (``cudaStreamSynchronize`` / ``cudaMemcpy`` D2H) and kernel launches of
each path, and the profiler's top operators of the pruned prefill.
"""
import collections, contextlib, functools, os, statistics, time

import torch

import vtoken
from vtoken.bench import models as M
from vtoken.bench.common import OracleFeed, kept_positions, runtime_call_counts
from vtoken.hooks import runtime as R
from vtoken.hooks import stage as S

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


def launches(fn):
    from torch.profiler import ProfilerActivity, profile
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn(); torch.cuda.synchronize()
    return runtime_call_counts(p.events()), p


regions = collections.defaultdict(list)


def timed_region(cls, name, sync):
    """Wrap a runtime method or a function of a hooks module (where it is looked up): wall ms with a device sync on both sides (``sync``), else the host
    ms alone (what a launch-bound forward pays)."""
    f = getattr(cls, name)

    @functools.wraps(f)
    def g(*a, **k):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            if sync:
                torch.cuda.synchronize()
            regions[(name, sync)].append(1000 * (time.perf_counter() - t0))
    return g, f


from vtoken.bench.common import Bench, paired_ratio, timed_interleaved

with vtoken.apply_pruning(model, method="fastv", keep=64) as h:
    pre()
    idx = kept_positions(h)
    R.Runtime.host_first_stage = False  # the generic device path must keep the same tokens
    pre()
    R.Runtime.host_first_stage = True
    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(idx, kept_positions(h)))
    log(f"host-planned first stage keeps the same positions as the generic path: {same}")
    assert same
bench = Bench(device="cuda")


@contextlib.contextmanager
def cold():
    """fastv with the host-plan cache off: every prefill lays out and plans from scratch (a prompt
    never seen before); the default run below reuses the plan of the repeated prompt."""
    saved = R.Runtime.plan_cache_size
    R.Runtime.plan_cache_size = 0
    try:
        with vtoken.apply_pruning(model, method="fastv", keep=64) as handle:
            yield handle
    finally:
        R.Runtime.plan_cache_size = saved


for _ in range(3):
    t_u, t_p, t_c, t_o = timed_interleaved(bench, [(contextlib.nullcontext, pre),
                                                   (lambda: vtoken.apply_pruning(model, method="fastv", keep=64), pre),
                                                   (cold, pre),
                                                   (lambda: OracleFeed(lm, idx, N), pre)], 41)
    log(f"batch {B}: TTFT (41 interleaved rounds, medians) unpruned {statistics.median(t_u):.2f} ms, "
        f"fastv-64 {statistics.median(t_p):.2f} ms (plan cached), {statistics.median(t_c):.2f} ms (cache off), "
        f"oracle {statistics.median(t_o):.2f} ms; paired ratio fastv/oracle {paired_ratio(t_p, t_o):.3f} "
        f"(cache off {paired_ratio(t_c, t_o):.3f})")

with vtoken.apply_pruning(model, method="fastv", keep=64) as h:
    cp, prof = launches(pre)
    idx = kept_positions(h)
    log("pruned launches/syncs/memcpy:", cp)
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35))
    for sync in (True, False):
        saved = {}
        regions_at = [(R.Runtime, n) for n in ("on_text_call", "on_layer", "on_multimodal_call", "on_multimodal_done")]
        regions_at += [(R, "run_stage"), (S, "relayout"), (S, "fill_signals")]  # module functions, where called
        for owner, name in regions_at:
            g, f = timed_region(owner, name, sync)
            saved[(owner, name)] = f
            setattr(owner, name, g)
        for _ in range(20):
            pre()
        for (owner, name), f in saved.items():
            setattr(owner, name, f)
    for (name, sync), ts in regions.items():
        kind = "synced wall" if sync else "host"
        log(f"region {name}: calls/prefill {len(ts) // 20}, {kind} ms/prefill {sum(ts) / 20:.3f}")
with OracleFeed(lm, idx, N):
    co, _ = launches(pre)
    log("oracle launches/syncs/memcpy:", co)
cu, _ = launches(pre)
log("unpruned launches/syncs/memcpy:", cu)
open(os.path.join(OUT, "fastv_overhead.txt"), "w").write("\n".join(lines) + "\n")
