"""Profile of one pruned vs unpruned dynamic-cache decode at batch 32 (LLaVA-1.5-7B shapes, random
bf16 weights): where does a pruned decode step's time go? Prints the top CUDA and CPU ops of 8
decode steps for each variant.  python benchmarks/profile/decode_batch32.py"""
import time

import torch

import vtoken
from vtoken.bench import models as M

model = M.build_llava(False, "cuda", torch.bfloat16)
inputs = M.llava_inputs(model, 32, device="cuda", dtype=torch.bfloat16)
for method in (None, "fastv", "visionzip"):
    h = vtoken.apply_pruning(model, method=method, keep=64) if method else None
    kw = dict(do_sample=False, min_new_tokens=24, max_new_tokens=24)
    with torch.no_grad():
        model.generate(**inputs, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(**inputs, **kw)
        torch.cuda.synchronize()
        t24 = time.perf_counter() - t0
        kw1 = dict(kw, min_new_tokens=8, max_new_tokens=8)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.generate(**inputs, **kw1)
            torch.cuda.synchronize()
    print(f"== {method or 'unpruned'}: 24 tokens in {t24 * 1e3:.1f} ms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
    if h is not None:
        h.remove()
