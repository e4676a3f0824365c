"""The decode step's two largest costs on a GPU, swept (issue 23 item 3): the batch-1 matrix-vector
products (cuBLAS through ``F.linear`` against :func:`vtoken.kernels.gemv.gemv` over its tile choices)
and :func:`vtoken.kernels.gather_attend` over its split count and tiles, at LLaVA-1.5-7B's shapes.

    python benchmarks/profile/decode_kernels.py [--out results.jsonl] [--quick]

Every timing is a CUDA-graph replay of one call per layer over 32 layers' worth of distinct weights /
KV buffers (so the L2 cache holds none of what a call reads, as in a decode step), median of 15
replays, reported per call (microseconds) with the bytes it must read and the bandwidth reached.
One JSON line per measurement, printed and appended to ``--out`` as it is made.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

from vtoken.kernels.gather_attend import _gather_attend_triton, gather_attend_reference
from vtoken.kernels.gemv import gemv

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
from bench_kernels import graph_ms  # noqa: E402

LAYERS = 32
D_MODEL, D_FF, VOCAB = 4096, 11008, 32000
#: LLaVA-1.5-7B's per-layer products at batch 1 (merged q/k/v and gate/up, as the fused engine runs them)
GEMV_SHAPES = {"qkv": (3 * D_MODEL, D_MODEL), "o": (D_MODEL, D_MODEL), "gate_up": (2 * D_FF, D_MODEL),
               "down": (D_MODEL, D_FF), "lm_head": (VOCAB, D_MODEL)}


def graph_us(calls, reps: int = 15) -> float:
    """Median microseconds per call of ``calls`` (a list of thunks, each captured once) in one CUDA
    graph (``bench_kernels.graph_ms`` over the thunks in turn)."""
    nxt = itertools.cycle(calls).__next__
    return graph_ms(lambda: nxt()(), iters=len(calls), reps=reps) * 1e3


def emit(row: dict, out) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def gemv_configs(quick: bool):
    for bn, bk, w, s in itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8), (2, 3, 4)):
        if bn * bk // (32 * w) > 64 or bn * bk < 32 * w:  # float32 partials per thread; a tile per warp
            continue
        if quick and (s != 3 or w == 2):
            continue
        yield bn, bk, w, s


def sweep_gemv(out, quick: bool) -> None:
    dev = torch.device("cuda")
    for name, (N, K) in GEMV_SHAPES.items():
        n = LAYERS if name != "lm_head" else 8
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(n)]
        x = torch.randn(1, 1, K, device=dev, dtype=torch.bfloat16)
        nbytes = N * K * 2
        want = F.linear(x.float(), ws[0].float())
        us = graph_us([lambda w=w: F.linear(x, w) for w in ws])
        emit(dict(kernel="linear", shape=name, N=N, K=K, impl="cublas", us=round(us, 2),
                  tb_s=round(nbytes / us / 1e6, 3)), out)
        best = None
        for tiles in gemv_configs(quick):
            try:
                got = gemv(x, ws[0], tiles=tiles)
                err = (got.float() - want).abs().max().item() / want.abs().max().item()
                us = graph_us([lambda w=w: gemv(x, w, tiles=tiles) for w in ws])
            except Exception as exc:  # a tile choice the compiler refuses
                emit(dict(kernel="linear", shape=name, impl="gemv", tiles=tiles, error=str(exc)[:200]), out)
                continue
            row = dict(kernel="linear", shape=name, N=N, K=K, impl="gemv", tiles=tiles, us=round(us, 2),
                       tb_s=round(nbytes / us / 1e6, 3), rel_err=float(f"{err:.2e}"))
            if best is None or us < best["us"]:
                best = row
            if not quick:
                print(json.dumps(row), flush=True)
        if best is not None:
            emit(dict(best, best=True), out)
        del ws
        torch.cuda.empty_cache()


def sweep_attention(out, quick: bool) -> None:
    """Decode attention over a kept list: batch 1 and 32 with 144 kept of a 160-slot buffer (pruned:
    64 visual + 64 text + 16 new), batch 32 with 672 of 704 (unpruned)."""
    dev = torch.device("cuda")
    H, Dh = 32, 128
    for B, L, kept in ((1, 160, 144), (32, 160, 144), (32, 704, 672)):
        bufs = [(torch.randn(B, H, L, Dh, device=dev, dtype=torch.bfloat16),
                 torch.randn(B, H, L, Dh, device=dev, dtype=torch.bfloat16)) for _ in range(LAYERS)]
        q = torch.randn(B, H, 1, Dh, device=dev, dtype=torch.bfloat16)
        idx = torch.arange(L, device=dev, dtype=torch.int32).expand(B, L).contiguous()
        klen = torch.full((B,), kept, device=dev, dtype=torch.int32)
        nbytes = 2 * B * H * kept * Dh * 2
        want = gather_attend_reference(q.float(), bufs[0][0].float(), bufs[0][1].float(), idx, klen)
        default = None
        best = None
        grid = itertools.product((None, 1, 2, 3, 4, 6), (16, 32, 64), (2, 4), (1, 2, 3))
        for splits, bn, w, s in ([(None, None, None, None)] + list(grid)):
            tiles = None if bn is None else (bn, w, s)
            if quick and tiles is not None and (s == 1 or w == 2):
                continue
            try:
                got = _gather_attend_triton(q, *bufs[0], idx, klen, Dh ** -0.5, splits, tiles=tiles)
                err = (got.float() - want).abs().max().item()
                us = graph_us([lambda kb=kb, vb=vb: _gather_attend_triton(q, kb, vb, idx, klen, Dh ** -0.5, splits,
                                                                          tiles=tiles) for kb, vb in bufs])
            except Exception as exc:
                emit(dict(kernel="gather_attend", B=B, L=L, splits=splits, tiles=tiles, error=str(exc)[:200]), out)
                continue
            row = dict(kernel="gather_attend", B=B, L=L, kept=kept, splits=splits, tiles=tiles, us=round(us, 2),
                       tb_s=round(nbytes / us / 1e6, 3), abs_err=float(f"{err:.2e}"))
            if tiles is None:
                default = row
                emit(dict(row, default=True), out)
            if best is None or us < best["us"]:
                best = row
        if best is not None:
            emit(dict(best, best=True, vs_default=round(default["us"] / best["us"], 3) if default else None), out)
        del bufs
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="fewer tile choices")
    p.add_argument("--only", choices=("gemv", "attention"), default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("decode_kernels.py needs a CUDA GPU")
    emit(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__), args.out)
    if args.only in (None, "gemv"):
        sweep_gemv(args.out, args.quick)
    if args.only in (None, "attention"):
        sweep_attention(args.out, args.quick)


if __name__ == "__main__":
    main()
