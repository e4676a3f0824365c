"""Where the batch-1 pruned ``generate`` waits for the GPU (issue 23, item 2), found on the CPU.

    python benchmarks/profile/host_syncs.py [--model llava|qwen2_5_vl] [--methods none,fastv,divprune] [--keep 8] [--new-tokens 1]

A CUDA call that needs a value computed on the GPU (``.item()``, ``int(t)``, ``bool(t)``,
``.tolist()``, ``.cpu()``, ``torch.nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
``repeat_interleave`` without ``output_size``) makes the host wait until the GPU has run everything
queued before it, so the launches after it no longer overlap the GPU's work: session 19's H100
profile of a pruned TTFT counted 18 ``cudaStreamSynchronize`` calls, 5.4 ms of host time, in a
15.7 ms call whose GPU was busy 10.4 ms. This script runs the bench's tiny LLaVA (or Qwen2.5-VL) on the CPU through
``apply_pruning(..., compile={"fused_ops": True})`` and ``generate(max_new_tokens=N)`` (after one
warm-up call), records every such call with the innermost frames of vtoken and transformers that
made it, and prints one line per call site with its count. On the CPU none of these waits costs
anything; on a GPU each one is a ``cudaStreamSynchronize`` (``.cpu()`` / ``.tolist()`` of a CPU
tensor count too, since on the GPU the same tensor would be on the device).
"""

from __future__ import annotations

import argparse
import collections

import torch

import vtoken
from vtoken.bench import models as M
from vtoken.bench.host_waits import recording


def syncs_of_generate(model, inputs, method: str, keep: int, new_tokens: int, engine: dict) -> collections.Counter:
    """The call sites of one ``generate`` (after a warm-up call) with a handle of ``method``."""
    handle = vtoken.apply_pruning(model, method=method, keep=keep, compile=engine)
    try:
        def gen():
            return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        gen()
        with recording() as sites:
            gen()
        return sites
    finally:
        handle.remove()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="none,fastv,divprune")
    p.add_argument("--keep", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=1)
    p.add_argument("--model", choices=("llava", "qwen2_5_vl"), default="llava")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.model == "llava":
        model = M.build_llava(True, torch.device("cpu"), torch.float32)
        inputs = M.llava_inputs(model, 1)
    else:
        model = M.build_qwen25_vl(True, torch.device("cpu"), torch.float32)
        inputs = M.qwen_inputs(model, 1, M.qwen_image_grid(True))
    for method in args.methods.split(","):
        sites = syncs_of_generate(model, inputs, method, args.keep, args.new_tokens, {"fused_ops": True})
        print(f"== {method}: {sum(sites.values())} host waits at {len(sites)} call sites")
        for (what, where), n in sites.most_common():
            print(f"{n:4d}  {what:32s} {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
