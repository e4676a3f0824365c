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
import os
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vtoken
import vtoken.hooks
import vtoken.kernels
import vtoken.scorers
from vtoken.bench import models as M

#: aten ops whose CUDA kernels return a value whose size or content the host must read
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive",
               "unique_dim", "repeat_interleave", "equal", "is_nonzero"}
#: Tensor methods that copy to the host (no aten op on a CPU tensor, a device-to-host copy on CUDA)
HOST_COPIES = ("cpu", "tolist", "numpy")


#: where vtoken's modules live (``vtoken.hooks`` / ``scorers`` / ``kernels`` are top-level folders of
#: a checkout, outside ``vtoken/``)
SOURCES = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                for m in (vtoken, vtoken.hooks, vtoken.scorers, vtoken.kernels))


def _shown(filename: str) -> bool:
    return (filename.startswith(SOURCES) or f"{os.sep}transformers{os.sep}" in filename) and "host_syncs" not in filename


def call_site(skip: int = 3, depth: int = 3) -> str:
    """The innermost ``depth`` frames of vtoken or transformers (``file:line function``)."""
    frames = [f for f in traceback.extract_stack()[:-skip] if _shown(f.filename)]
    return " <- ".join(f"{f.filename.split('site-packages/')[-1].split(os.sep + 'main' + os.sep)[-1]}:{f.lineno} {f.name}"
                       for f in reversed(frames[-depth:]))


class SyncRecorder(TorchDispatchMode):
    """Counts the calls that would make the host wait for the GPU, by call site."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNCING_OPS and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
            self.sites[f"{name:20s} {call_site()}"] += 1
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in (args[1] if len(args) > 1 else ())):
            self.sites[f"{'index(bool)':20s} {call_site()}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording():
    """Yields a :class:`SyncRecorder` recording dispatched ops and the host-copy methods."""
    rec = SyncRecorder()
    originals = {m: getattr(torch.Tensor, m) for m in HOST_COPIES}

    def wrap(m):
        def method(self, *a, **k):
            rec.sites[f"{m:20s} {call_site(skip=2)}"] += 1
            return originals[m](self, *a, **k)
        return method

    try:
        for m in HOST_COPIES:
            setattr(torch.Tensor, m, wrap(m))
        with rec:
            yield rec
    finally:
        for m, fn in originals.items():
            setattr(torch.Tensor, m, fn)


@contextlib.contextmanager
def cuda_waits():
    """On CUDA: yields a Counter of the call sites where PyTorch reports a synchronizing operation
    (``torch.cuda.set_sync_debug_mode("warn")``: every device-to-host copy, ``item``, ``nonzero``...),
    each recorded from the warning's own Python stack."""
    sites = collections.Counter()
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if "synchroniz" in str(message):
            sites[call_site(skip=2, depth=4)] += 1
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
        with recording() as rec:
            gen()
        return rec.sites
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
        for site, n in sites.most_common():
            print(f"{n:4d}  {site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
