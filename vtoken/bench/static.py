"""Static-cache / CUDA-graph decode benchmark (:class:`vtoken.engine.StaticDecoder`), LLaVA-1.5-7B.

    python -m vtoken.bench.static --out DIR            # CUDA, full size, random bf16 weights, SDPA
    python -m vtoken.bench.static --out DIR --tiny     # CPU smoke run (same classes, tiny sizes)

Rows (medians of ``--repeats`` synchronised runs, same process, same model):

- ``hf-eager``: ``model.generate`` (transformers' dynamic cache, eager launches), unpruned and with
  ``fastv`` keep 64; decode ms/token = (generate time - prefill time) / (new tokens - 1).
- ``static-graph``: StaticDecoder with the decode step captured in a CUDA graph (capture time
  reported separately; decode ms/token over graph replays), unpruned and ``fastv`` keep 64.
- ``static-graph-fused``: the same with ``fused_ops=True`` (add+RMSNorm, rotary, SiLU*up fused:
  :mod:`vtoken.engine.fused_decode`).
- ``static-eager``: the same static buffers and gather_attend kernel without the graph.
- max batch in ``--mem-gb`` GB (64 new tokens): largest batch the static path runs without running
  out of memory (memory capped with ``torch.cuda.set_per_process_memory_fraction``), prefill in
  chunks of ``--prefill-batch`` samples, unpruned vs fastv keep 64; found by doubling then bisection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_ms(fn, dev, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def decode_rows(model, inputs_for, batches, new_tokens, repeats, keep, dev):
    import vtoken
    from vtoken.engine import StaticDecoder

    rows = []
    for batch in batches:
        inputs = inputs_for(batch)
        n_ctx = int(inputs["input_ids"].shape[1])

        def prefill():
            with torch.no_grad():
                return model(**inputs, use_cache=True, logits_to_keep=1)

        def hf_generate():
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        for variant in ("unpruned", f"fastv-{keep}"):
            handle = None if variant == "unpruned" else vtoken.apply_pruning(model, method="fastv", keep=keep)
            try:
                ttft = _median_ms(prefill, dev, repeats)
                gen = _median_ms(hf_generate, dev, repeats)
                rows.append(dict(path="hf-eager", variant=variant, batch=batch, context=n_ctx, ttft_ms=ttft,
                                 decode_ms_per_token=(gen - ttft) / (new_tokens - 1)))
                paths = ((("static-graph", True, False), ("static-graph-fused", True, True), ("static-eager", False, False))
                         if dev.type == "cuda" else (("static-eager", False, False), ("static-eager-fused", False, True)))
                for path, graph, fused in paths:
                    if path == "static-eager" and batch != max(batches) and dev.type == "cuda":
                        continue
                    stats = []
                    # graphs are captured once per shape, then replayed
                    dec = StaticDecoder(model, cuda_graph=graph, fused_ops=fused)
                    for _ in range(repeats + 1):
                        dec.generate(**inputs, max_new_tokens=new_tokens, timing=True)
                        stats.append(dec.last)
                    capture = stats[0]["capture_ms"]
                    stats = stats[1:]  # the first run compiles the kernels and captures the graphs
                    med = {k: statistics.median(s[k] for s in stats) for k in ("prefill_ms", "decode_ms_per_token")}
                    rows.append(dict(path=path, variant=variant, batch=batch, context=n_ctx, ttft_ms=med["prefill_ms"],
                                     capture_ms=capture, decode_ms_per_token=med["decode_ms_per_token"],
                                     graph_prefill_from_layer=stats[-1]["graph_prefill_from_layer"],
                                     kv_mb=stats[-1]["kv_bytes"] / 2**20, kv_lengths=stats[-1]["prefill_lengths"]))
            finally:
                if handle is not None:
                    handle.remove()
            for r in rows:
                if "tokens_per_s" not in r and r["decode_ms_per_token"]:
                    r["tokens_per_s"] = 1000.0 * r["batch"] / r["decode_ms_per_token"]
                    print(_fmt(r), flush=True)
    return rows


def _fits(model, inputs_for, batch, new_tokens, prefill_batch, dev) -> bool:
    from vtoken.engine import StaticDecoder

    try:
        inputs = inputs_for(batch)
        StaticDecoder(model).generate(**inputs, max_new_tokens=new_tokens, prefill_batch=prefill_batch)
        _sync(dev)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        inputs = None
        torch.cuda.empty_cache()


def max_batch_rows(model, inputs_for, keep, mem_gb, new_tokens, prefill_batch, start, probes, dev):
    import vtoken

    index = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, mem_gb * 2**30 / total), index)
    rows = []
    try:
        for variant in ("unpruned", f"fastv-{keep}"):
            handle = None if variant == "unpruned" else vtoken.apply_pruning(model, method="fastv", keep=keep)
            try:
                lo, hi, b, used = 0, None, start, 0
                while used < probes:
                    used += 1
                    if _fits(model, inputs_for, b, new_tokens, prefill_batch, dev):
                        lo = b
                    else:
                        hi = b
                    if hi is None:
                        b *= 2
                    elif hi - lo <= max(8, lo // 16):
                        break
                    else:
                        b = (lo + hi) // 2
                rows.append(dict(path="static-graph", variant=variant, max_batch=lo, first_failure=hi,
                                 mem_gb=mem_gb, new_tokens=new_tokens, prefill_batch=prefill_batch, probes=used))
                print(_fmt(rows[-1]), flush=True)
            finally:
                if handle is not None:
                    handle.remove()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
    return rows


def _fmt(r: dict) -> str:
    return "  ".join(f"{k}={round(v, 2) if isinstance(v, float) else v}" for k, v in r.items())


def markdown(rows: list, meta: dict) -> str:
    out = [f"# Static-cache / CUDA-graph decode ({meta['model']})", "",
           f"{meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}; "
           f"{meta['dtype']}, random weights, SDPA prefill; {meta['new_tokens']} new tokens; medians of "
           f"{meta['repeats']}. Command: `{meta['command']}`", "",
           "| path | variant | batch | context | TTFT ms | decode ms/token | tokens/s | KV MB | graph capture ms |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "max_batch" in r:
            continue
        out.append("| {path} | {variant} | {batch} | {context} | {ttft:.1f} | {dec:.2f} | {tps} | {kv} | {cap} |".format(
            path=r["path"], variant=r["variant"], batch=r["batch"], context=r["context"], ttft=r["ttft_ms"],
            dec=r["decode_ms_per_token"], tps=f"{r.get('tokens_per_s', 0):.0f}",
            kv=f"{r['kv_mb']:.0f}" if "kv_mb" in r else "–",
            cap=f"{r['capture_ms']:.0f}" if r.get("capture_ms") else "–"))
    mb = [r for r in rows if "max_batch" in r]
    if mb:
        out += ["", f"Largest batch in {mb[0]['mem_gb']} GB ({mb[0]['new_tokens']} new tokens, static path, prefill in "
                f"chunks of {mb[0]['prefill_batch']}):", "", "| variant | max batch | first failing batch | probes |",
                "| --- | ---: | ---: | ---: |"]
        out += [f"| {r['variant']} | {r['max_batch']} | {r['first_failure']} | {r['probes']} |" for r in mb]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtoken.bench.static", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/static")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke run)")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--mem-gb", type=float, default=60.0)
    p.add_argument("--max-batch-probes", type=int, default=6, help="0 skips the max-batch search")
    p.add_argument("--prefill-batch", type=int, default=16)
    args = p.parse_args(argv)

    import transformers

    from vtoken.bench import models as bm

    dev = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = bm.build_llava(args.tiny, dev, dtype)
    keep = min(args.keep, 8) if args.tiny else args.keep

    def inputs_for(batch):
        return bm.llava_inputs(model, batch, device=dev, dtype=dtype)

    batches = [int(b) for b in args.batch.split(",") if b]
    rows = decode_rows(model, inputs_for, batches, args.new_tokens, args.repeats, keep, dev) if batches else []
    if args.max_batch_probes and dev.type == "cuda":
        rows += max_batch_rows(model, inputs_for, keep, args.mem_gb, 64, args.prefill_batch, 64,
                               args.max_batch_probes, dev)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    meta = dict(model="LLaVA-1.5-7B" if not args.tiny else "tiny LLaVA (CPU smoke run)",
                device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, transformers=transformers.__version__, triton=triton_version,
                dtype=str(dtype).replace("torch.", ""), new_tokens=args.new_tokens, repeats=args.repeats,
                command="python -m vtoken.bench.static " + " ".join(argv if argv is not None else os.sys.argv[1:]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "static_results.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "static_results.md"), "w") as f:
        f.write(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
