"""Host microseconds of each piece of the first stage's host preparation (LLaVA-1.5-7B inputs,
batch 1, fastv keep 64) on the machine it runs on, plus the host cost of one small CUDA op.

    OUT=dir python benchmarks/profile/host_prep.py   # CUDA; from outside the repository root

Pieces: the two device->host copies of ``input_ids`` / the mask, the adapter's layout, the NumPy
plan (``prepare_prefill`` on the CPU), and the upload three ways (one pinned non-blocking copy as
vtoken does; a pageable copy; a persistent pinned staging buffer). Min and median of 300 calls.
"""
import os, statistics, time

import numpy as np
import torch

import vtoken
from vtoken.bench import models as M
from vtoken.hooks import prefill_plan as P
from vtoken.hooks.call_state import CallContext
from vtoken.hooks.host_plans import plan_before_vision

OUT = os.environ.get("OUT", "/tmp")
DEV = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu: a smoke run on a tiny model
sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
lines = []


def log(s):
    print(s, flush=True)
    lines.append(s)


def us(fn, n=300):
    for _ in range(20):
        fn()
    sync()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(1e6 * (time.perf_counter() - t0))
    sync()
    return f"min {min(ts):8.1f} us  median {statistics.median(ts):8.1f} us"


model = M.build_llava(DEV != "cuda", DEV, torch.bfloat16 if DEV == "cuda" else torch.float32)
inputs = M.llava_inputs(model, 1, device=DEV, dtype=next(model.parameters()).dtype)
ids, mask = inputs["input_ids"], inputs["attention_mask"]
handle = vtoken.apply_pruning(model, method="fastv", keep=64)
rt = handle.runtime
ids_h, mask_h = ids.cpu(), mask.cpu().bool()
layout = rt.adapter.layout(ids_h, inputs, None)
log(f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'}; torch {torch.__version__}; N={ids.shape[1]}")
log("ids.cpu()                 " + us(lambda: ids.cpu()))
log("mask.cpu().bool()         " + us(lambda: mask.cpu().bool()))
log("adapter.layout            " + us(lambda: rt.adapter.layout(ids_h, inputs, None)))
log("prepare_prefill (cpu)     " + us(lambda: P.prepare_prefill(layout, mask_h, 64, "cpu")))
log("prepare_prefill (cuda)    " + us(lambda: P.prepare_prefill(layout, mask_h, 64, DEV)))
log("plan_before_vision (whole) " + us(lambda: plan_before_vision(rt, CallContext(), inputs)))
buf = torch.from_numpy(np.zeros(12000, dtype=np.uint8))
if DEV == "cuda":
    log("pin_memory + H2D 12 KB    " + us(lambda: buf.pin_memory().to(DEV, non_blocking=True)))
log("pageable H2D 12 KB        " + us(lambda: buf.to(DEV)))
if DEV == "cuda":
    staging = torch.empty(12000, dtype=torch.uint8).pin_memory()
    log("persistent pinned H2D     " + us(lambda: staging.to(DEV, non_blocking=True)))
x = torch.zeros(640, device=DEV)
log("one small CUDA op (x + 1) " + us(lambda: x + 1))
log("10 small CUDA ops         " + us(lambda: [x + 1 for _ in range(10)]))
handle.remove()
open(os.path.join(OUT, "host_prep.txt"), "w").write("\n".join(lines) + "\n")
