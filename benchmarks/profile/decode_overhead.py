"""Eager decode step of LLaVA-1.5-7B: unpruned against fastv keep 64 (batch ``BATCH``, default 1).

    OUT=dir python benchmarks/profile/decode_overhead.py   # CUDA; from outside the repository root

Two measurements of the same thing, to separate ``generate``'s own overhead from the step:
1. ``model.generate`` ms/token: generate(33) - generate(1) over 32 steps, interleaved rounds
   (unpruned, pruned), median of the per-round values.
2. A hand-written greedy loop: one prefill, then 32 single-token forwards with the cache,
   synchronised around the loop only; interleaved rounds likewise.
Then, per variant, the profiler over 8 steps of the loop: kernel launches, device syncs, the
device time of the kernels, and the top host operators (writes ``$OUT/decode_overhead.txt``).
``DEVICE=cpu`` runs the same on the tiny test model (a smoke run).
"""
import collections, contextlib, os, statistics, sys, time

import torch

import vtoken
from vtoken.bench import models as M
from vtoken.bench.common import runtime_call_counts

OUT = os.environ.get("OUT", "/tmp")
B = int(os.environ.get("BATCH", "1"))
DEV = os.environ.get("DEVICE", "cuda")
ROUNDS = int(os.environ.get("ROUNDS", "7"))
STEPS = 32
sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
lines = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    lines.append(s)


model = M.build_llava(DEV != "cuda", DEV, torch.bfloat16 if DEV == "cuda" else torch.float32)
inputs = M.llava_inputs(model, B, device=DEV, dtype=next(model.parameters()).dtype)


def gen(n):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


import inspect

CACHE_KW = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill():
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return [getattr(out, CACHE_KW, None) or out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), inputs["attention_mask"]]


def steps(state, n):
    """``n`` greedy single-token forwards with the cache, continuing ``state``."""
    cache, tok, mask = state
    for _ in range(n):
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = model(input_ids=tok, attention_mask=mask, use_cache=True, logits_to_keep=1, **{CACHE_KW: cache})
        cache, tok = getattr(out, CACHE_KW, None) or out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    state[:] = [cache, tok, mask]


def loop(n):
    """Greedy decode by hand: ms per step of ``n`` single-token forwards after one prefill."""
    state = prefill()
    sync()
    t0 = time.perf_counter()
    steps(state, n)
    sync()
    return 1000 * (time.perf_counter() - t0) / n


def gen_ms_per_token():
    sync()
    t0 = time.perf_counter()
    gen(1)
    sync()
    t1 = time.perf_counter()
    gen(STEPS + 1)
    sync()
    return 1000 * ((time.perf_counter() - t1) - (t1 - t0)) / STEPS


def pruned():
    return vtoken.apply_pruning(model, method="fastv", keep=64 if DEV == "cuda" else 4)


variants = [("unpruned", contextlib.nullcontext), ("fastv-64", pruned)]
with torch.no_grad():
    for _, enter in variants:  # warm-up (Triton compilation, cuBLAS workspaces)
        with enter():
            gen(2)
            loop(2)
    res = collections.defaultdict(list)
    for _ in range(ROUNDS):
        for name, enter in variants:
            with enter():
                res[(name, "generate")].append(gen_ms_per_token())
                res[(name, "loop")].append(loop(STEPS))
    for kind in ("generate", "loop"):
        u, p = res[("unpruned", kind)], res[("fastv-64", kind)]
        log(f"batch {B} {kind:8s} ms/token ({ROUNDS} rounds, medians): unpruned {statistics.median(u):.2f}, "
            f"fastv-64 {statistics.median(p):.2f}, paired ratio {statistics.median(a / b for a, b in zip(p, u)):.3f}")

    if DEV == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for name, enter in variants:
            with enter():
                state = prefill()
                steps(state, 2)
                sync()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    steps(state, 8)
                    sync()
            c = runtime_call_counts(prof.events())
            kernel_us = 0.0
            for e in prof.key_averages():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    kernel_us += e.self_device_time_total
            log(f"{name}: per step (8 steps) launches {c.get('launch', 0) / 8:.0f}, "
                f"syncs {c.get('sync', 0) / 8:.2f}, memcpy {c.get('memcpy', 0) / 8:.2f}, kernel time {kernel_us / 8 / 1000:.2f} ms")
            log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
open(os.path.join(OUT, "decode_overhead.txt"), "w").write("\n".join(lines) + "\n")
