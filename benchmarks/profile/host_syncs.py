"""Where the batch-1 pruned ``generate`` waits for the GPU (issue 23, item 2), found on the CPU.

    python benchmarks/profile/host_syncs.py [--methods none,fastv,divprune] [--keep 8] [--new-tokens 1]

A CUDA call that needs a value computed on the GPU (``.item()``, ``int(t)``, ``bool(t)``,
``.tolist()``, ``.cpu()``, ``torch.nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
``repeat_interleave`` without ``output_size``) makes the host wait until the GPU has run everything
queued before it, so the launches after it no longer overlap the GPU's work: session 19's H100
profile of a pruned TTFT counted 18 ``cudaStreamSynchronize`` calls, 5.4 ms of host time, in a
15.7 ms call whose GPU was busy 10.4 ms. This script runs the bench's tiny LLaVA on the CPU through
``apply_pruning(..., compile={"fused_ops": True})`` and ``generate(max_new_tokens=N)`` (after one
warm-up call), records every such call with the innermost frames of vtoken and transformers that
made it, and prints one line per call site with its count. On the CPU none of these waits costs
anything; on a GPU each one is a ``cudaStreamSynchronize`` (``.cpu()`` / ``.tolist()`` of a CPU
tensor count too, since on the GPU the same tensor would be on the device).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import warnings

import torch

import vtoken
from vtoken.bench import models as M
from vtoken.bench.host_waits import SIZE_SYNC_OPS, SYNC_OPS, SyncCounter, TransferCounter, call_site


@contextlib.contextmanager
def recording():
    """Yields a Counter of (what waits, call site) filled while the block runs (on any device)."""
    sites = collections.Counter()
    ops, copies = SyncCounter(SYNC_OPS | SIZE_SYNC_OPS, where=call_site), TransferCounter(where=call_site)
    with copies, ops:
        yield sites
    sites.update({(name.replace("aten.", "").replace(".default", ""), where): n for (name, where), n in (ops.sites + copies.sites).items()})


@contextlib.contextmanager
def cuda_waits():
    """On CUDA: yields a Counter of the call sites where PyTorch reports a synchronizing operation
    (``torch.cuda.set_sync_debug_mode("warn")``: every device-to-host copy, ``item``, ``nonzero``...),
    each recorded from the warning's own Python stack."""
    sites = collections.Counter()
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if "synchroniz" in str(message):
            sites[("cuda sync", call_site(depth=4))] += 1
        else:
            shown(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = shown


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
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = M.build_llava(True, torch.device("cpu"), torch.float32)
    inputs = M.llava_inputs(model, 1)
    for method in args.methods.split(","):
        sites = syncs_of_generate(model, inputs, method, args.keep, args.new_tokens, {"fused_ops": True})
        print(f"== {method}: {sum(sites.values())} host waits at {len(sites)} call sites")
        for (what, where), n in sites.most_common():
            print(f"{n:4d}  {what:32s} {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
