"""Suites ``qwen-long`` (the full Qwen2.5-VL-7B, vision tower included) and ``qwen-lm`` (its
language model alone).

``qwen-long``: batch 1, 4K / 8K / 16K visual tokens as 1 / 2 / 4 images of 1792 x 1792 px
(128 x 128 patches of 14 px = 4096 tokens each after the 2 x 2 merge). Rows: unpruned, ``fastv``
keep 0.111 (11.1 % of each image's tokens) and the oracle (the same vision work, then the
language model on exactly the kept tokens with their original M-RoPE positions). TTFT is one
whole-model prefill forward; ``vision_ms`` is the vision tower's forward inside those same runs
(CUDA events around ``model.model.visual``), ``lm_ms`` = TTFT - vision (the language model,
merging and position computation). Each with transformers' SDPA vision path (one attention call
per window / image) and with ``vtoken.kernels.patch_vision_varlen`` (one varlen launch a layer).

``qwen-lm`` (the earlier suite, kept): the language model alone fed random image embeddings,
unpruned vs the oracle vs the hooks driven directly.
"""

from __future__ import annotations

import torch

import vtoken
from vtoken.bench import models as M
from vtoken.bench.common import OracleFeed, ModuleTimer, cache_of, kept_positions, kv_bytes, kv_fields, timed, token_counts

QWEN_KEEP = 0.111


def run_qwen_long(bench, pool, visual=(4096, 8192, 16384), keep=QWEN_KEEP, paths=("varlen", "sdpa"), method="fastv",
                  one_image=False):
    """``one_image``: each visual-token count as ONE square image (16384 tokens: 256 x 256 patches)
    instead of images of 4096 tokens. On the ``sdpa`` path the pruned rows are the handle as
    ``apply_pruning`` installs it (its varlen vision tower, the default) and with
    ``vision_varlen=False`` (transformers' tower)."""
    from vtoken.kernels import patch_vision_varlen

    model = pool.get("qwen2.5-vl-7b")
    merge = model.config.vision_config.spatial_merge_size
    full_per_image = 4096
    lm = model.model.language_model
    summary = {}
    for path in paths:
        remove = patch_vision_varlen(model.model.visual, backend=bench.backend) if path == "varlen" else None
        try:
            for n_vis in visual:
                if one_image:
                    side = int(round(n_vis ** 0.5))
                    if side * side != n_vis:
                        raise ValueError(f"--qwen-one-image needs square visual-token counts; got {n_vis}")
                    n_images, grid = 1, (1, side * merge, side * merge)
                    if bench.tiny:
                        grid = (1, max(merge, grid[1] // 8), max(merge, grid[2] // 8))
                else:
                    if n_vis % full_per_image:
                        raise ValueError(f"--qwen-visual entries must be multiples of {full_per_image} (one image each); "
                                         f"got {n_vis}")
                    n_images, grid = n_vis // full_per_image, M.qwen_image_grid(bench.tiny)
                per_image = grid[0] * grid[1] * grid[2] // merge ** 2
                if bench.over_budget():
                    bench.skip("qwen-long", f"vision path {path}, {n_vis} visual tokens and later")
                    break
                inputs = M.qwen_inputs(model, n_images, grid, device=bench.device, dtype=bench.dtype)
                N = inputs["input_ids"].shape[1]
                visual_tokens = n_images * per_image

                def prefill():
                    return model(**inputs, logits_to_keep=1, use_cache=True)

                common = dict(suite="qwen-long", model="qwen2.5-vl-7b", batch=1, vision_path=path, images=n_images,
                              image_grid_thw=list(grid), visual_tokens=visual_tokens, context=N, attn="sdpa")

                def row(method_name, keep_label, ttft, runs, vis, kv, **more):
                    r = dict(common, method=method_name, keep=keep_label, ttft_ms=round(ttft, 2),
                             vision_ms=None if vis is None else round(vis, 2),
                             lm_ms=None if vis is None else round(ttft - vis, 2),
                             vision_share=None if vis is None else round(vis / ttft, 3),
                             **kv_fields(kv), peak_mem_gb=bench.peak_gb(), runs=runs)
                    r.update(more)
                    return bench.add(**r)

                with ModuleTimer(bench, model.model.visual) as vt:
                    bench.reset_peak()
                    t_full, runs, out = timed(bench, prefill, timers=[vt])
                    kv = kv_bytes(cache_of(out))
                    del out
                    base = row("unpruned", 1.0, t_full, runs, vt.median_ms(), kv, kept_visual=visual_tokens,
                               context_after=N)
                    if path == "sdpa":  # the handle with transformers' own tower, for comparison
                        with vtoken.apply_pruning(model, method=method, keep=keep, backend=bench.backend,
                                                  vision_varlen=False) as handle:
                            bench.reset_peak()
                            t, runs, out = timed(bench, prefill, timers=[vt])
                            del out
                            row(f"vision_varlen=False {method}[{bench.backend}]", keep, t, runs, vt.median_ms(), None,
                                speedup_vs_unpruned=round(t_full / t, 3))
                    with vtoken.apply_pruning(model, method=method, keep=keep, backend=bench.backend) as handle:
                        bench.reset_peak()
                        t, runs, out = timed(bench, prefill, timers=[vt])
                        kv = kv_bytes(cache_of(out))
                        del out
                        counts = token_counts(handle)
                        index = kept_positions(handle)
                        pruned = row(f"{method}[{bench.backend}]", keep, t, runs, vt.median_ms(), kv,
                                     kept_visual=counts["kept_visual"], context_after=counts["context_after"],
                                     speedup_vs_unpruned=round(t_full / t, 3))
                    with OracleFeed(lm, index, N) as feed:
                        bench.reset_peak()
                        t_o, runs, out = timed(bench, prefill, timers=[vt])
                        kv = kv_bytes(cache_of(out))
                        del out
                        oracle = row("oracle", keep, t_o, runs, vt.median_ms(), kv, kept_visual=counts["kept_visual"],
                                     context_after=feed.fed[-1], speedup_vs_unpruned=round(t_full / t_o, 3))
                pruned["ratio_to_oracle"] = round(t / t_o, 3)
                if base.get("lm_ms") and pruned.get("lm_ms"):
                    pruned["lm_speedup_vs_unpruned"] = round(base["lm_ms"] / pruned["lm_ms"], 3)
                summary[(path, n_vis)] = (base, pruned, oracle)
                del inputs
                bench.empty_cache()
        finally:
            if remove is not None:
                remove()
    return summary


def run_qwen_lm(bench, pool, visual=(4096, 8192, 16384), keep=0.11, methods=("fastv",), profile=False):
    """The language model alone at 4K/8K/16K visual tokens: unpruned vs oracle vs pruned, the hooks
    driven directly (the vision tower's own time is in ``qwen-long``)."""
    from vtoken.adapters.base import layout_from_runs

    model = pool.get("qwen2.5-vl-7b")
    dev = bench.device
    for n_vis in visual:
        if bench.over_budget():
            bench.skip("qwen-lm", f"{n_vis} visual tokens and later")
            break
        if bench.tiny:
            n_vis = max(16, n_vis // 64)
        side = int(round(n_vis ** 0.5))
        grid = (1, side * 2, side * 2)
        n_vis = side * side
        ids = [151644, 100, 200, M.QWEN_VSTART] + [M.QWEN_IMAGE] * n_vis + [M.QWEN_VEND] + list(range(300, 332))
        input_ids = torch.tensor([ids], device=dev)
        tt = torch.tensor([[0] * 4 + [1] * n_vis + [0] * 33], device=dev)
        with torch.no_grad():
            embeds = model.model.get_input_embeddings()(input_ids)
        pos = model.model.get_rope_index(input_ids, image_grid_thw=torch.tensor([grid], device=dev),
                                         attention_mask=torch.ones_like(input_ids), mm_token_type_ids=tt)[0]

        def lm_prefill(e=embeds, p=pos):
            h = model.model.language_model(inputs_embeds=e, position_ids=p, use_cache=True).last_hidden_state
            return model.lm_head(h[:, -1:])

        common = dict(suite="qwen-lm", model="qwen2.5-vl-7b-lm", batch=1, visual_tokens=n_vis, context=len(ids))
        bench.reset_peak()
        t_full, runs, _ = timed(bench, lm_prefill)
        bench.add(**common, method="unpruned", keep=1.0, ttft_ms=round(t_full, 2), runs=runs, context_after=len(ids),
                  peak_mem_gb=bench.peak_gb())
        kept = max(1, round(keep * n_vis))
        idx = torch.cat([torch.arange(4), 4 + torch.linspace(0, n_vis - 1, kept).round().long(),
                         torch.arange(4 + n_vis, len(ids))]).to(dev)
        bench.reset_peak()
        t_oracle, runs, _ = timed(bench, lambda: lm_prefill(embeds[:, idx], pos[..., idx]))
        bench.add(**common, method="oracle", keep=keep, ttft_ms=round(t_oracle, 2), runs=runs,
                  context_after=int(idx.numel()), kept_visual=kept, peak_mem_gb=bench.peak_gb())
        for method in methods:
            handle = vtoken.apply_pruning(model, method=method, keep=keep, backend=bench.backend)
            rt = handle.runtime

            def pruned():
                rt.on_multimodal_call({})
                rt.ctx.visual_call = True  # the image embeddings are fed directly: this call carries visual tokens
                rt.ctx.layout = layout_from_runs(input_ids == M.QWEN_IMAGE, torch.zeros_like(input_ids),
                                                 {0: [n_vis]}, {0: [(1, side, side)]})
                try:
                    return lm_prefill()
                finally:
                    rt.on_multimodal_done()

            try:
                bench.reset_peak()
                t, runs, _ = timed(bench, pruned)
                counts = token_counts(handle)
                if profile and bench.cuda and n_vis == max(visual):
                    from torch.profiler import ProfilerActivity, profile as torch_profile

                    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        pruned()
                        bench.sync()
                    bench.log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
            finally:
                handle.remove()
            bench.add(**common, method=f"{method}[{bench.backend}]", keep=keep, ttft_ms=round(t, 2), runs=runs,
                      kept_visual=counts["kept_visual"], context_after=counts["context_after"],
                      speedup_vs_unpruned=round(t_full / t, 3), ratio_to_oracle=round(t / t_oracle, 3),
                      peak_mem_gb=bench.peak_gb())
        del embeds, pos
        bench.empty_cache()
