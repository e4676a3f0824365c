#!/usr/bin/env python
"""GPU benchmarks of vtoken's kernels against the PyTorch paths they replace (issue 4).

Sections (``--only`` picks some):
  attend   attend_and_score vs SDPA forward alone (flash backend) vs eager attention with materialised
           probabilities (the ``output_attentions=True`` path), N = 1K..32K: time, extra peak memory,
           TFLOP/s (causal forward FLOPs 2*B*H*N^2*D for every method).
  gather   gather_attend vs gather(index) + SDPA vs SDPA over the full cache: decode (Q=1), batch
           1/8/32/64, kept 10/25/50 %, ragged kept counts, contexts 4K/8K/16K.
  varlen   varlen_attention vs the per-window SDPA loop of transformers' Qwen2.5-VL vision attention
           (hidden 1280, 16 heads, 64-patch windows, 16K patches), plus the whole Qwen2.5-VL-7B
           vision tower (random bf16 weights), unpatched SDPA path vs patch_vision_varlen.

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call, median), except the
tower (synchronised wall clock, median of repeats). Results go to JSON and Markdown:

    python benchmarks/kernels/bench_kernels.py --json results.json --md results.md
    python benchmarks/kernels/bench_kernels.py --render results.json --md results.md   # Markdown only
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

RESULTS: dict = {}
OUT_JSON = None
DTYPE = torch.bfloat16
PROFILE_DIR = None
BACKEND = "auto"
DEV = "cuda"  # "cpu" only for --cpu-smoke (tiny sizes through the Triton interpreter, timings meaningless)


def save():
    if OUT_JSON:
        with open(OUT_JSON, "w") as f:
            json.dump(RESULTS, f, indent=1)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def log(*a):
    print(*a, flush=True)


def bench_ms(fn, warmup=25, rep=100):
    if DEV == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def extra_peak_bytes(fn):
    """Peak memory allocated during one call, above what was allocated before it."""
    if DEV == "cpu":
        fn()
        return 0
    sync()
    empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


def graph_ms(fn, iters=20, reps=10):
    """Per-call time of ``iters`` back-to-back calls captured in one CUDA graph (no launch overhead)."""
    if DEV == "cpu":
        return bench_ms(fn)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / iters)
    del g
    return statistics.median(times)


def launch_ms(fn, iters=100):
    """Per-call time of back-to-back eager calls (includes Python and launch overhead)."""
    if DEV == "cpu":
        return bench_ms(fn)
    fn()
    sync()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def try_run(fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        empty_cache()
        return "OOM"


# ----------------------------------------------------------------------------------------- attend


def eager_attention_with_probs(q, k, v, mask, scale):
    """transformers' eager path: materialise probabilities (fp32 softmax), then P @ V."""
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    w = w + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(w, v)
    return out, w[:, :, -1, :].float().mean(1)


def bench_attend(Ns, configs, rows_list):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vtoken.kernels import attend_and_score, attend_and_score_reference

    rows_out = RESULTS.setdefault("attend_and_score", [])
    dev = DEV
    for name, B, H, Hkv, D in configs:
        for N in Ns:
            torch.manual_seed(N)
            q = torch.randn(B, H, N, D, device=dev, dtype=DTYPE)
            k = torch.randn(B, Hkv, N, D, device=dev, dtype=DTYPE)
            v = torch.randn(B, Hkv, N, D, device=dev, dtype=DTYPE)
            scale = D ** -0.5
            flops = 2.0 * B * H * N * N * D  # causal forward: half of 4*B*H*N^2*D
            rec = dict(model=name, B=B, H=H, Hkv=Hkv, N=N, D=D, dtype="bf16", flops=flops)

            kk, vv, gqa = k, v, H != Hkv

            def sdpa():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION if DEV == "cuda" else SDPBackend.MATH):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

            try:
                ref_out = sdpa()
            except RuntimeError:  # flash without GQA support: expand K/V once, outside the timing
                kk, vv, gqa = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), False
                rec["sdpa_note"] = "K/V expanded to H heads (flash backend without enable_gqa)"
                ref_out = sdpa()
            rec["sdpa_flash_ms"] = bench_ms(sdpa)
            rec["sdpa_flash_graph_ms"] = graph_ms(sdpa, iters=5, reps=5)
            rec["sdpa_flash_mem"] = extra_peak_bytes(sdpa)

            def ours_fwd():
                return attend_and_score(q, k, v, score_rows=None, backend=BACKEND)

            out, _ = ours_fwd()
            rec["fwd_only_relerr_vs_sdpa"] = rel_err(out, ref_out)
            rec["ours_fwd_only_ms"] = bench_ms(ours_fwd)
            for R in rows_list:
                rows = (N - R + torch.arange(R, device=dev)).expand(B, R).contiguous()

                def ours():
                    return attend_and_score(q, k, v, score_rows=rows, backend=BACKEND)

                out, scores = ours()
                rec[f"ours_R{R}_ms"] = bench_ms(ours)
                if R == 1:
                    rec["ours_R1_graph_ms"] = graph_ms(ours, iters=5, reps=5)
                rec[f"ours_R{R}_mem"] = extra_peak_bytes(ours)
                if N <= 8192:
                    _, s_ref = attend_and_score_reference(q.float(), k.float(), v.float(), score_rows=rows)
                    rec[f"ours_R{R}_scores_relerr"] = rel_err(scores, s_ref)
            rec["ours_relerr_vs_sdpa"] = rel_err(out, ref_out)
            if name.startswith("llava"):
                def eager_run():
                    mask = torch.full((N, N), float("-inf"), device=dev, dtype=q.dtype).triu_(1)[None, None]
                    fn = lambda: eager_attention_with_probs(q, k, v, mask, scale)  # noqa: E731
                    ms = bench_ms(fn, warmup=5, rep=30)
                    mem = extra_peak_bytes(fn)
                    del mask
                    return ms, mem

                res = try_run(eager_run)
                rec["eager_ms"], rec["eager_mem"] = ("OOM", "OOM") if res == "OOM" else res
            for key in list(rec):
                if key.endswith("_ms") and not key.endswith("graph_ms") and isinstance(rec[key], float):
                    rec[key.replace("_ms", "_tflops")] = flops / rec[key] / 1e9
            rows_out.append(rec)
            save()
            log("attend", {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in rec.items()})
            empty_cache()


# ----------------------------------------------------------------------------------------- gather


def bench_gather(cases):
    from vtoken.kernels import gather_attend

    rows_out = RESULTS.setdefault("gather_attend", [])
    for case in cases:
        rows_out.append(_gather_case(gather_attend, *case))
        save()
        log("gather", {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in rows_out[-1].items()})
        empty_cache()


def _gather_case(gather_attend, name, B, H, Hkv, D, L, frac, Q):
    """One gather_attend case; its buffers are freed when it returns."""
    dev = DEV
    torch.manual_seed(B * L)
    K = int(L * frac)
    q = torch.randn(B, H, Q, D, device=dev, dtype=DTYPE)
    kb = torch.randn(B, Hkv, L, D, device=dev, dtype=DTYPE)
    vb = torch.randn(B, Hkv, L, D, device=dev, dtype=DTYPE)
    idx = torch.stack([torch.randperm(L, device=dev)[:K].sort().values for _ in range(B)]).to(torch.int32)
    lens = (K - torch.randint(0, max(1, K // 4), (B,), device=dev)).to(torch.int32)  # ragged: 75-100 % of K
    rec = dict(model=name, B=B, H=H, Hkv=Hkv, D=D, L=L, kept_frac=frac, K=K, Q=Q, ragged="K*[0.75,1]")
    gidx = idx.long()[:, None, :, None].expand(B, Hkv, K, D)
    t = torch.arange(K, device=dev)
    mask = (t[None, :] < lens[:, None].long())[:, None, None, :].expand(B, 1, Q, K)
    gqa = H != Hkv

    def ours():
        return gather_attend(q, kb, vb, idx, lens, backend=BACKEND)

    def gather_sdpa_mask():
        kg, vg = kb.gather(2, gidx), vb.gather(2, gidx)
        return F.scaled_dot_product_attention(q, kg, vg, attn_mask=mask, enable_gqa=gqa)

    def gather_sdpa_nomask():  # best case for the baseline: equal kept counts, no mask needed
        kg, vg = kb.gather(2, gidx), vb.gather(2, gidx)
        return F.scaled_dot_product_attention(q, kg, vg, enable_gqa=gqa)

    def full_sdpa():
        return F.scaled_dot_product_attention(q, kb, vb, enable_gqa=gqa)

    if Q == 1:
        rec["relerr_vs_gather_sdpa"] = rel_err(ours(), gather_sdpa_mask())
    for key, fn in (("ours", ours), ("gather_sdpa_mask", gather_sdpa_mask),
                    ("gather_sdpa_nomask", gather_sdpa_nomask), ("full_sdpa", full_sdpa)):
        res = try_run(lambda: bench_ms(fn))
        rec[f"{key}_ms"] = res
    rec["ours_graph_ms"] = try_run(lambda: graph_ms(ours))
    rec["gather_sdpa_mask_graph_ms"] = try_run(lambda: graph_ms(gather_sdpa_mask))
    rec["full_sdpa_graph_ms"] = try_run(lambda: graph_ms(full_sdpa))
    rec["ours_launch_ms"] = launch_ms(ours)
    kept_bytes = 2 * B * Hkv * int(lens.float().mean().item()) * D * 2
    if isinstance(rec["ours_ms"], float):
        rec["ours_GBps"] = kept_bytes / rec["ours_ms"] / 1e6
    return rec


# ----------------------------------------------------------------------------------------- varlen


def per_window_sdpa(q4, k4, v4, cu, scale):
    """What transformers' Qwen2.5-VL vision attention does on the SDPA path (q4: [1, H, T, D])."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    splits = [torch.split(t, lengths, dim=2) for t in (q4, k4, v4)]
    outs = [F.scaled_dot_product_attention(a, b, c, scale=scale) for a, b, c in zip(*splits)]
    return torch.cat(outs, dim=2)


def bench_varlen(T, H, D, layouts):
    from vtoken.kernels import varlen_attention

    rows_out = RESULTS.setdefault("varlen_attention", [])
    dev = DEV
    for lname, seg in layouts:
        lengths = [seg] * (T // seg) + ([T % seg] if T % seg else [])
        cu = torch.tensor([0] + lengths, device=dev).cumsum(0).to(torch.int32)
        torch.manual_seed(seg)
        q4, k4, v4 = (torch.randn(1, H, T, D, device=dev, dtype=DTYPE) for _ in range(3))
        q, k, v = (x[0].transpose(0, 1) for x in (q4, k4, v4))  # [T, H, D] strided views, as the tower has
        scale = D ** -0.5
        rec = dict(layout=lname, T=T, H=H, D=D, segments=len(lengths), seg_len=seg, dtype="bf16")
        ref = per_window_sdpa(q4, k4, v4, cu, scale)[0].transpose(0, 1)
        out = varlen_attention(q, k, v, cu, scale=scale, max_seqlen=max(lengths), backend=BACKEND)
        rec["relerr"] = rel_err(out, ref)
        rec["sdpa_loop_ms"] = bench_ms(lambda: per_window_sdpa(q4, k4, v4, cu, scale))
        rec["ours_ms"] = bench_ms(lambda: varlen_attention(q, k, v, cu, scale=scale, max_seqlen=max(lengths), backend=BACKEND))
        rec["ours_no_maxlen_ms"] = bench_ms(lambda: varlen_attention(q, k, v, cu, scale=scale, backend=BACKEND))
        flops = 4.0 * H * D * sum(n * n for n in lengths)
        rec["ours_tflops"] = flops / rec["ours_ms"] / 1e9
        rows_out.append(rec)
        save()
        log("varlen", rec)


def bench_tower(grids, reps, **cfg_overrides):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from vtoken.kernels import patch_vision_varlen

    rows_out = RESULTS.setdefault("qwen25vl_7b_vision_tower", [])
    cfg = Qwen2_5_VLVisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                 out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14,
                                 window_size=112, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    for key, val in cfg_overrides.items():
        setattr(cfg, key, val)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEV):
        tower = Qwen2_5_VisionTransformerPretrainedModel(cfg)
    tower = tower.to(DTYPE).eval()

    def timed(x, grid):
        ts = []
        for i in range(reps + 1):
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = tower(x, grid_thw=grid)
            sync()
            if i:
                ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts), out.pooler_output

    for gname, grid_list in grids:
        grid = torch.tensor(grid_list, device=DEV)
        n = int(grid.prod(-1).sum())
        x = torch.randn(n, 3 * 2 * 14 * 14, device=DEV, dtype=DTYPE)
        rec = dict(input=gname, grid_thw=grid_list, patches=n, dtype="bf16", reps=reps)
        rec["sdpa_path_ms"], ref = timed(x, grid)
        remove = patch_vision_varlen(tower, backend=BACKEND)
        try:
            rec["varlen_patched_ms"], out = timed(x, grid)
        finally:
            remove()
        rec["relerr"] = rel_err(out, ref)
        rec["ratio"] = rec["varlen_patched_ms"] / rec["sdpa_path_ms"]
        if PROFILE_DIR and DEV == "cuda":
            remove = patch_vision_varlen(tower, backend=BACKEND)
            try:
                tag = "".join(c if c.isalnum() else "_" for c in gname)
                rec["profile_patched"] = profile_tower(tower, x, grid, os.path.join(PROFILE_DIR, f"profile_{tag}.txt"))
            except Exception as exc:  # profiling is best effort
                rec["profile_patched"] = f"failed: {exc!r}"
            finally:
                remove()
        rows_out.append(rec)
        save()
        log("tower", rec)


# ----------------------------------------------------------------------------------------- host overhead


def _nop4(a, b, c, d):
    pass


def _nop32(p0, p1, p2, p3, p4, p5, p6, p7, i0, i1, i2, i3, i4, i5, i6, i7,
           i8, i9, i10, i11, i12, i13, i14, i15, i16, i17, i18, i19, i20, i21, i22, i23):
    pass


def host_us(fn, n=300):
    """Host time to enqueue one call (no sync inside the loop; the GPU work here is tiny)."""
    n = n if DEV == "cuda" else 1
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / n * 1e6


def bench_overhead():
    import triton

    from vtoken.kernels import attend_and_score, gather_attend

    dev = DEV
    rec = {}
    x = torch.randn(1024, device=dev)
    ptrs = [torch.randn(16, device=dev) for _ in range(8)]
    nop4, nop32 = triton.jit(_nop4), triton.jit(_nop32)
    rec["torch_add_us"] = host_us(lambda: x.add(1.0))
    rec["triton_nop_4args_us"] = host_us(lambda: nop4[(1,)](ptrs[0], ptrs[1], 3, 5))
    ints = list(range(3, 27))
    rec["triton_nop_32args_us"] = host_us(lambda: nop32[(1,)](*ptrs, *ints))
    small = DEV == "cpu"
    q = torch.randn(1, 32, 1, 128, device=dev, dtype=DTYPE)
    kb = torch.randn(1, 32, 256 if small else 4096, 128, device=dev, dtype=DTYPE)
    vb = torch.randn_like(kb)
    idx = torch.randperm(kb.shape[2], device=dev)[:kb.shape[2] // 10].sort().values[None].to(torch.int32)
    lens = torch.tensor([kb.shape[2] // 10 - 3], device=dev, dtype=torch.int32)
    rec["sdpa_decode_full_4k_us"] = host_us(lambda: F.scaled_dot_product_attention(q, kb, vb))
    rec["gather_attend_us"] = host_us(lambda: gather_attend(q, kb, vb, idx, lens, backend=BACKEND))
    rec["gather_attend_1split_us"] = host_us(lambda: gather_attend(q, kb, vb, idx, lens, num_splits=1,
                                                                   backend=BACKEND))
    qa = torch.randn(1, 32, 64 if small else 1024, 128, device=dev, dtype=DTYPE)
    ka, va = torch.randn_like(qa), torch.randn_like(qa)
    rows = torch.tensor([[qa.shape[2] - 1]], device=dev)
    rec["attend_fwd_only_us"] = host_us(lambda: attend_and_score(qa, ka, va, score_rows=None, backend=BACKEND))
    rec["attend_R1_us"] = host_us(lambda: attend_and_score(qa, ka, va, score_rows=rows, backend=BACKEND))
    RESULTS["host_overhead_us"] = rec
    save()
    log("overhead", {k_: round(v_, 1) for k_, v_ in rec.items()})


def profile_tower(tower, x, grid, path):
    """torch.profiler table of one patched tower forward: where the remaining time goes."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        tower(x, grid_thw=grid)
        sync()
    ka = prof.key_averages()
    table = ka.table(sort_by="self_cuda_time_total", row_limit=25)

    def dev_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    # Device kernels only: operator rows (aten::...) repeat their kernels' time.
    kernels = [e for e in ka if dev_us(e) and not e.key.startswith("aten::")]
    total = sum(dev_us(e) for e in kernels)
    gemm = sum(dev_us(e) for e in ka if e.key in ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear"))
    attn = sum(dev_us(e) for e in kernels if "varlen" in e.key.lower())
    groups = {"attention (varlen kernel)": attn, "GEMM": gemm, "other kernels": total - attn - gemm}
    if path:
        with open(path, "w") as f:
            f.write(table)
    return {"gpu_kernel_ms_total": total / 1e3, **{k_: v_ / 1e3 for k_, v_ in groups.items()}}


# ----------------------------------------------------------------------------------------- report


def fmt(x, nd=3):
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    return f"{x:.{nd}f}"


def mib(x):
    return x if isinstance(x, str) else f"{x / 2**20:.0f}"


def _ratio(a, b, nd=2):
    return fmt(a / b, nd) if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"


def render_md(res):
    env = res.get("env", {})
    lines = ["# vtoken kernel benchmarks", ""]
    lines += [f"- device: {env.get('device')} ({env.get('sms')} SMs)",
              f"- torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
              f"CUDA {env.get('cuda')}, python {env.get('python')}",
              f"- command: `{env.get('command')}` (from `benchmarks/kernels/run_gpu.sh`)", f"- date: {env.get('date')}",
              "- timing: `triton.testing.do_bench` (CUDA events, L2 flushed before each call, median) unless noted: "
              "GPU time plus whatever host time is not hidden behind the flush. `graph` columns: per call inside a "
              "captured CUDA graph (no host overhead). Random bf16 inputs.", ""]
    ho = res.get("host_overhead_us")
    if ho:
        lines += ["## Host (Python + launch) time per call, µs", "",
                  "Enqueue time of back-to-back calls, no sync (the GPU work is tiny). This is the floor of any "
                  "eager-mode call; CUDA graphs remove it.", "", "| call | µs |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in ho.items()] + [""]
    if res.get("attend_and_score"):
        lines += ["## attend_and_score (causal prefill + scores of chosen rows)", "",
                  "ms; memory = extra peak above the inputs, MiB; TFLOP/s counts the causal forward (2·B·H·N²·D) for "
                  "every method. `R=1` scores the last row, `R=64` the last 64 rows, over all N keys. Eager = "
                  "transformers' eager attention (fp32 softmax, N×N probabilities materialised) + head-mean of the "
                  "last row. Batch 1, head dim 128.", "",
                  "| model (H/Hkv) | N | SDPA flash | ours fwd-only | ours R=1 | ours R=64 | eager | R=1 / SDPA | "
                  "graph: SDPA | graph: ours R=1 | graph ratio | eager / ours R=1 | TFLOP/s ours R=1 | TFLOP/s SDPA | "
                  "mem SDPA | mem ours R=1 | mem eager |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["attend_and_score"]:
            e = r.get("eager_ms", "-")
            lines.append(
                f"| {r['model']} ({r['H']}/{r['Hkv']}) | {r['N']} | {fmt(r['sdpa_flash_ms'])} | "
                f"{fmt(r['ours_fwd_only_ms'])} | {fmt(r['ours_R1_ms'])} | {fmt(r.get('ours_R64_ms'))} | "
                f"{fmt(e) if e != '-' else '-'} | {_ratio(r['ours_R1_ms'], r['sdpa_flash_ms'])} | "
                f"{fmt(r.get('sdpa_flash_graph_ms'))} | {fmt(r.get('ours_R1_graph_ms'))} | "
                f"{_ratio(r.get('ours_R1_graph_ms'), r.get('sdpa_flash_graph_ms'))} | "
                f"{_ratio(e, r['ours_R1_ms'], 1) if e != 'OOM' else 'OOM'} | {fmt(r['ours_R1_tflops'], 0)} | "
                f"{fmt(r['sdpa_flash_tflops'], 0)} | {mib(r['sdpa_flash_mem'])} | {mib(r['ours_R1_mem'])} | "
                f"{mib(r['eager_mem']) if 'eager_mem' in r else '-'} |")
        lines.append("")
    if res.get("gather_attend"):
        lines += ["## gather_attend (decode over a kept set of a static KV buffer)", "",
                  "Ragged kept counts (each sample keeps 75–100 % of K = kept·L). ms. `gather+SDPA` = `gather` of the "
                  "kept K/V (the index_select baseline) then SDPA with the ragged mask; `nomask` = the same without "
                  "the mask (what equal counts would allow); `full` = SDPA over the whole cache. `graph` = per call "
                  "inside a CUDA graph, the decode mode with a static cache. GB/s = kept K+V bytes / do_bench time.", "",
                  "| model (H/Hkv) | B | L | kept | Q | ours | gather+SDPA | gather+SDPA nomask | full SDPA | "
                  "speedup vs gather+SDPA | ours / full | graph: ours | graph: gather+SDPA | graph: full | "
                  "graph speedup vs gather+SDPA | graph ours / full | ours GB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["gather_attend"]:
            o, g, f_ = r["ours_ms"], r["gather_sdpa_mask_ms"], r["full_sdpa_ms"]
            og, gg, fg = r.get("ours_graph_ms"), r.get("gather_sdpa_mask_graph_ms"), r.get("full_sdpa_graph_ms")
            lines.append(
                f"| {r['model']} ({r['H']}/{r['Hkv']}) | {r['B']} | {r['L']} | {int(r['kept_frac'] * 100)}% | "
                f"{r['Q']} | {fmt(o)} | {fmt(g)} | {fmt(r['gather_sdpa_nomask_ms'])} | {fmt(f_)} | {_ratio(g, o)} | "
                f"{_ratio(o, f_)} | {fmt(og)} | {fmt(gg)} | {fmt(fg)} | {_ratio(gg, og)} | {_ratio(og, fg)} | "
                f"{fmt(r.get('ours_GBps'), 0)} |")
        lines.append("")
    if res.get("varlen_attention"):
        lines += ["## varlen_attention (block-diagonal, one launch) vs the per-window SDPA loop", "",
                  "The loop is what transformers' Qwen2.5-VL vision attention runs on its SDPA path "
                  "(`lengths.tolist()`, `torch.split`, one SDPA per segment, `torch.cat`). bf16, head dim 80.", "",
                  "| layout | tokens | heads × dim | segments | SDPA loop ms | ours ms | ours, max_seqlen read from "
                  "device ms | ours / loop | ours TFLOP/s | rel. err |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["varlen_attention"]:
            lines.append(
                f"| {r['layout']} | {r['T']} | {r['H']}×{r['D']} | {r['segments']} | {fmt(r['sdpa_loop_ms'])} | "
                f"{fmt(r['ours_ms'])} | {fmt(r['ours_no_maxlen_ms'])} | {_ratio(r['ours_ms'], r['sdpa_loop_ms'], 3)} | "
                f"{fmt(r['ours_tflops'], 0)} | {r['relerr']:.1e} |")
        lines.append("")
    if res.get("qwen25vl_7b_vision_tower"):
        lines += ["## Qwen2.5-VL-7B vision tower (random bf16 weights), whole forward", "",
                  "Synchronised wall clock, median of repeats after one warm-up. Patched = `patch_vision_varlen`.", "",
                  "| input | grid_thw | patches | transformers SDPA path ms | patched (varlen) ms | ratio | rel. err |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["qwen25vl_7b_vision_tower"]:
            lines.append(f"| {r['input']} | {r['grid_thw']} | {r['patches']} | {fmt(r['sdpa_path_ms'], 1)} | "
                         f"{fmt(r['varlen_patched_ms'], 1)} | {fmt(r['ratio'], 3)} | {r['relerr']:.1e} |")
        prof = [(r["input"], r["profile_patched"]) for r in res["qwen25vl_7b_vision_tower"]
                if isinstance(r.get("profile_patched"), dict)]
        if prof:
            lines += ["", "Patched tower, torch.profiler (one forward): GPU kernel time by group, ms.", "",
                      "| input | all kernels | attention (varlen) | GEMM | other kernels |", "|---|---|---|---|---|"]
            for name, p_ in prof:
                lines.append(f"| {name} | {fmt(p_['gpu_kernel_ms_total'], 1)} | "
                             f"{fmt(p_['attention (varlen kernel)'], 1)} | {fmt(p_['GEMM'], 1)} | "
                             f"{fmt(p_['other kernels'], 1)} |")
        lines.append("")
    if res.get("autotune_choices"):
        lines += ["## Autotuner choices", ""] + [f"- `{k}`: {v}" for k, v in res["autotune_choices"].items()] + [""]
    if res.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def main():
    global OUT_JSON
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--only", default="overhead,varlen,tower,attend,gather")
    p.add_argument("--profile-dir", default=None, help="write torch.profiler tables of the patched tower here")
    p.add_argument("--quick", action="store_true", help="fewer sizes (smoke run)")
    p.add_argument("--render", default=None, help="render Markdown from an existing JSON and exit")
    p.add_argument("--cpu-smoke", action="store_true", help="run every code path at tiny sizes on the CPU")
    a = p.parse_args()
    if a.render:
        with open(a.render) as f:
            res = json.load(f)
        md = render_md(res)
        if a.md:
            with open(a.md, "w") as f:
                f.write(md + "\n")
        print(md)
        return
    global PROFILE_DIR
    OUT_JSON = a.json
    PROFILE_DIR = a.profile_dir
    if a.cpu_smoke:
        return cpu_smoke()
    import transformers
    import triton

    RESULTS["env"] = dict(
        device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__, triton=triton.__version__,
        transformers=transformers.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        command="python " + " ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        sms=torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 0,
        autotune=os.environ.get("VTOKEN_KERNELS_AUTOTUNE", "1"),
    )
    only = set(a.only.split(","))
    log(RESULTS["env"])
    if "overhead" in only:
        bench_overhead()
    if "varlen" in only:
        bench_varlen(16384, 16, 80, [("windows of 64 patches (window layers)", 64),
                                     ("frames of 1024 patches (full layers, video)", 1024),
                                     ("one 16K image (full layers, image)", 16384)])
    if "tower" in only:
        grids = [("video 16x32x32", [[16, 32, 32]])] if a.quick else [
            ("video 16x32x32", [[16, 32, 32]]), ("image 128x128", [[1, 128, 128]]), ("image 64x64", [[1, 64, 64]])]
        bench_tower(grids, reps=2 if a.quick else 3)
    if "attend" in only:
        Ns = [1024, 4096] if a.quick else [1024, 4096, 16384, 32768]
        bench_attend(Ns, [("llava-1.5-7b", 1, 32, 32, 128), ("qwen2.5-vl-7b", 1, 28, 4, 128)], rows_list=[1, 64])
    if "gather" in only:
        cases = []
        Bs = [1, 8] if a.quick else [1, 8, 32, 64]
        Ls = [8192] if a.quick else [4096, 8192, 16384]
        for B in Bs:
            for L in Ls:
                for frac in (0.1, 0.25, 0.5):
                    cases.append(("llava-1.5-7b", B, 32, 32, 128, L, frac, 1))
        for B in Bs:
            for frac in (0.1, 0.5):
                cases.append(("qwen2.5-vl-7b", B, 28, 4, 128, 16384, frac, 1))
        cases.append(("qwen2.5-vl-7b", 8, 28, 4, 128, 16384, 0.25, 8))  # small prefill over the kept set
        bench_gather(cases)
    RESULTS["autotune_choices"] = autotune_choices()
    save()
    if a.md:
        with open(a.md, "w") as f:
            f.write(render_md(RESULTS) + "\n")
    log(render_md(RESULTS))


def autotune_choices():
    """The configs Triton's autotuner picked, per key (forward of attend_and_score, long-segment varlen)."""
    import importlib

    out = {}
    for mod_name, attr in (("vtoken.kernels.attend_and_score", "_fwd_launchers"), ("vtoken.kernels.varlen", "_launchers")):
        tuned = getattr(importlib.import_module(mod_name), attr, {}).get("tuned")
        for key, cfg in getattr(tuned, "cache", {}).items():
            out[f"{mod_name.rsplit('.', 1)[-1]}{key}"] = str(cfg)
    return out


def cpu_smoke():
    """Every code path at tiny sizes on the CPU (Triton interpreter); catches errors before a GPU run."""
    global DEV, DTYPE, BACKEND
    DEV, DTYPE, BACKEND = "cpu", torch.float32, "triton"
    os.environ["TRITON_INTERPRET"] = "1"
    bench_overhead()
    bench_attend([64, 100], [("llava-1.5-7b", 1, 2, 2, 16), ("qwen2.5-vl-7b", 1, 4, 1, 16)], rows_list=[1, 8])
    bench_gather([("llava-1.5-7b", 2, 2, 2, 16, 128, 0.25, 1), ("qwen2.5-vl-7b", 2, 4, 1, 16, 128, 0.5, 2)])
    bench_varlen(96, 2, 20, [("windows", 16), ("one", 96)])
    bench_tower([("tiny", [[1, 8, 8]])], reps=1, depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                out_hidden_size=24, fullatt_block_indexes=[1], window_size=56)
    print(render_md(RESULTS))


if __name__ == "__main__":
    main()
