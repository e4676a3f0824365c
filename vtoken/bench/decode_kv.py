"""Decode-time stages on the GPU: KV bytes, decode ms/token and peak memory of ``model.generate``
plain and with each decode-time method (``a2sf``, ``lookm``), on random-weight LLaVA-1.5-7B
(``--tiny``: a tiny one, runs on the CPU); ``--engine static`` / ``static-fused``: the same on
:class:`vtoken.engine.StaticDecoder` (:func:`measure_static`).

    python -m vtoken.bench.decode_kv --batch 1,8 --keep 64 --new-tokens 32 --out decode_kv.json
    python -m vtoken.bench.decode_kv --engine static-fused --batch 1,32 --methods a2sf,lookm,zipvl_kv

KV bytes are measured on the cache ``generate`` returns (keys + values of every layer, after the
last step: prompt + new tokens, minus what the stage evicted); decode ms/token is ``generate`` of
T tokens minus ``generate`` of 1 token over T - 1 steps (the eviction runs in the first decode
step, so it is inside that difference).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import vtoken
from vtoken.bench.common import cache_of
from vtoken.bench.models import build_llava, llava_inputs
from vtoken.hooks import held_bytes


def _generate(model, inputs, n):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          return_dict_in_generate=True)


def _timed(model, inputs, n, sync, repeats):
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = _generate(model, inputs, n)
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2], out


def measure(model, inputs, methods=("a2sf", "lookm"), keep=64, new_tokens=32, repeats=3) -> list:
    """One row per variant (``none`` = plain generate, then each method): kv_bytes of the final
    cache, readmit_mb (a readmit plan's stash, held besides), decode_ms_per_token, peak_mem_gb
    (CUDA), visual tokens kept per image."""
    dev = inputs["input_ids"].device
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    rows = []
    for method in ("none",) + tuple(methods):
        handle = None if method == "none" else vtoken.apply_pruning(model, method=method, keep=keep)
        try:
            with torch.no_grad():
                _generate(model, inputs, 2)  # warm-up
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                long_ms, out = _timed(model, inputs, new_tokens, sync, repeats)
                held = held_bytes(cache_of(out))
                kv, readmit = held["kv"] + held["low_bits"], held["readmit"]
                del out
                short_ms, out = _timed(model, inputs, 1, sync, repeats)
                del out
        finally:
            if handle is not None:
                handle.remove()
        rows.append(dict(method=method, keep=None if method == "none" else keep, batch=int(inputs["input_ids"].shape[0]),
                         prompt=int(inputs["input_ids"].shape[1]), new_tokens=new_tokens, kv_bytes=kv,
                         kv_mb=round(kv / 2**20, 2), readmit_mb=round(readmit / 2**20, 2),
                         decode_ms_per_token=round((long_ms - short_ms) / max(1, new_tokens - 1), 3),
                         peak_mem_gb=round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if cuda else None))
    return rows


def measure_static(model, inputs, methods=("a2sf", "lookm", "zipvl_kv"), keep=64, new_tokens=32, repeats=3,
                   fused_ops=False) -> list:
    """The same variants on :class:`vtoken.engine.StaticDecoder` (CUDA graphs on CUDA): decode
    ms/token over the graph replays (median of ``repeats`` calls; the stage and the per-phase
    captures are excluded, ``capture_ms`` reports them), and ``kv_read_mb``: the KV bytes the last
    decode step reads through the kept-index lists (full-precision entries, plus the packed entries
    and their scales / offsets of ``zipvl_kv``); the static buffers themselves keep their size."""
    from vtoken.engine import StaticDecoder

    rows = []
    for method in ("none",) + tuple(methods):
        handle = None if method == "none" else vtoken.apply_pruning(model, method=method, keep=keep)
        try:
            dec = StaticDecoder(model, fused_ops=fused_ops)
            runs = []
            for _ in range(repeats + 1):  # the first call is a warm-up
                dec.generate(**inputs, max_new_tokens=new_tokens, timing=True)
                runs.append(dict(dec.last))
        finally:
            if handle is not None:
                handle.remove()
        last = runs[-1]
        esize = next(model.parameters()).element_size()
        read = 0
        for layer, g in enumerate(dec.layer_group):
            hkv, d = dec._kv_shape(layer)
            read += 2 * int(dec.groups[g].count.sum()) * hkv * d * esize
            low = None if dec.stages is None else dec.stages.low.get(layer)
            if low is not None:  # packed key / value entries and their scales / offsets
                per_entry = sum(t[0, 0, 0].numel() * t.element_size() for t in low[:6])
                read += int(low.length.sum()) * hkv * per_entry
        rows.append(dict(engine="static" + ("-fused" if fused_ops else ""), method=method,
                         keep=None if method == "none" else keep, batch=int(inputs["input_ids"].shape[0]),
                         prompt=int(inputs["input_ids"].shape[1]), new_tokens=new_tokens,
                         kv_bytes=last["kv_bytes"], kv_mb=round(last["kv_bytes"] / 2**20, 2),
                         kv_read_mb=round(read / 2**20, 2), cuda_graph=last["cuda_graph"],
                         capture_ms=round(last["capture_ms"], 1),
                         decode_ms_per_token=round(sorted(r["decode_ms_per_token"] for r in runs[1:])[repeats // 2], 3),
                         peak_mem_gb=None))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random model (CPU)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--keep", type=float, default=64, help="visual tokens kept per image (a float < 1: a fraction)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--methods", default="a2sf,lookm")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.add_argument("--engine", default="generate", choices=("generate", "static", "static-fused"),
                   help="model.generate on the dynamic cache, or vtoken.engine.StaticDecoder (fused_ops with -fused)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_llava(args.tiny, device, dtype)
    keep = int(args.keep) if args.keep >= 1 else args.keep
    rows = []
    for b in (int(x) for x in args.batch.split(",")):
        inputs = llava_inputs(model, b, device=device, dtype=dtype)
        methods = tuple(m for m in args.methods.split(",") if m)
        if args.engine == "generate":
            rows += measure(model, inputs, methods, keep, args.new_tokens, args.repeats)
        else:
            rows += measure_static(model, inputs, methods, keep, args.new_tokens, args.repeats,
                                   fused_ops=args.engine == "static-fused")
        if args.out:  # after every batch size: a run cut by a time limit keeps what it measured
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    print("| engine | batch | method | keep | KV MB | readmit stash MB | KV read MB | decode ms/token | peak GB |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.get('engine', 'generate')} | {r['batch']} | {r['method']} | {r['keep'] or '-'} | {r['kv_mb']} | "
              f"{r.get('readmit_mb', '-')} | {r.get('kv_read_mb', '-')} | {r['decode_ms_per_token']} | "
              f"{r['peak_mem_gb'] if r['peak_mem_gb'] is not None else '-'} |")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
