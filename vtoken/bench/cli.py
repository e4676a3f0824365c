"""``vtoken bench``: end-to-end speed of pruned generation on full-size architectures (CUDA).

Builds LLaVA-1.5-7B and Qwen2.5-VL-7B from their public config values with random bf16
weights (speed does not depend on weight values; nothing can be downloaded here), SDPA
attention, and measures with CUDA synchronisation, medians over repeats:

- TTFT: one prefill forward of the whole model (vision tower included) returning the last logit;
- decode ms/token: ``generate`` of ``--new-tokens`` tokens, minus TTFT, per token;
- peak memory and KV-cache bytes after prefill;
for: unpruned; each method at each budget; the ORACLE (the same model fed only the kept tokens:
vision tower + projector, then the language model on the kept embeddings, no scoring, no hooks);
and the peer style of FastV's released HF path (the whole model in eager attention with
``output_attentions=True``).

    vtoken bench --out benchmarks/e2e            # all models
    vtoken bench --models llava --batch 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def _timed(fn, repeats: int, warmup: int = 1):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def build_llava_7b():
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration._from_config(cfg, torch_dtype=torch.bfloat16)
    return model.eval()


def llava_inputs(model, batch: int, text_tokens: int = 64):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = [1] + torch.randint(100, 30000, (8,), generator=g).tolist() + [32000] * 576
    ids += torch.randint(100, 30000, (text_tokens - 9,), generator=g).tolist()
    input_ids = torch.tensor([ids] * batch, device="cuda")
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values=torch.randn(batch, 3, 336, 336, device="cuda", dtype=torch.bfloat16))


def kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def measure_llava(args, results):
    import torch

    import vtoken

    model = build_llava_7b()
    lm, head = model.model.language_model, model.lm_head
    for batch in args.batch:
        inputs = llava_inputs(model, batch)
        N = inputs["input_ids"].shape[1]

        def prefill():
            with torch.no_grad():
                return model(**inputs, logits_to_keep=1, use_cache=True)

        def decode_ms(ttft):
            def gen():
                model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False)

            total = _timed(gen, max(2, args.repeats // 2))
            return (total - ttft) / (args.new_tokens - 1)

        def row(name, keep, ttft, dec, kv, peak):
            results.append(dict(model="llava-1.5-7b", batch=batch, method=name, keep=keep, context=N, ttft_ms=round(ttft, 2),
                                decode_ms_per_token=None if dec is None else round(dec, 2),
                                tokens_per_s=None if dec is None else round(1000.0 * batch / dec, 1),
                                kv_cache_mb=None if kv is None else round(kv / 2**20, 1), peak_mem_gb=round(peak / 2**30, 2)))
            print(results[-1], flush=True)

        torch.cuda.reset_peak_memory_stats()
        ttft = _timed(prefill, args.repeats)
        kv = kv_bytes(prefill().past_key_values)
        dec = decode_ms(ttft)
        row("unpruned", 576, ttft, dec, kv, torch.cuda.max_memory_allocated())
        for method in args.methods:
            for keep in args.keep:
                with vtoken.apply_pruning(model, method=method, keep=keep, backend=args.backend):
                    torch.cuda.reset_peak_memory_stats()
                    ttft = _timed(prefill, args.repeats)
                    kv = kv_bytes(prefill().past_key_values)
                    dec = decode_ms(ttft) if keep == min(args.keep) else None
                    row(f"{method}[{args.backend}]", keep, ttft, dec, kv, torch.cuda.max_memory_allocated())
                # the oracle: same vision work, then the language model on the kept tokens only
                with torch.no_grad():
                    embeds = model.model.get_input_embeddings()(inputs["input_ids"])
                    kept_len = N - 576 + keep

                    def oracle():
                        with torch.no_grad():
                            out = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                                 vision_feature_layer=-2,
                                                                 vision_feature_select_strategy="default")
                            feats = getattr(out, "pooler_output", out)
                            feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
                            e = embeds[:, :kept_len].clone()
                            e[:, 9:9 + keep] = feats.view(batch, 576, -1)[:, :keep].to(e.dtype)
                            h = lm(inputs_embeds=e, use_cache=True).last_hidden_state
                            return head(h[:, -1:])

                    torch.cuda.reset_peak_memory_stats()
                    ttft = _timed(oracle, args.repeats)
                    row(f"oracle", keep, ttft, None, None, torch.cuda.max_memory_allocated())
        # FastV's released HF path: whole model in eager attention, attention outputs materialised
        if batch == 1:
            model.set_attn_implementation("eager")

            def eager_scored():
                with torch.no_grad():
                    return model(**inputs, logits_to_keep=1, output_attentions=True)

            torch.cuda.reset_peak_memory_stats()
            ttft = _timed(eager_scored, args.repeats)
            row("peer:eager+output_attentions", 576, ttft, None, None, torch.cuda.max_memory_allocated())
            model.set_attn_implementation("sdpa")
    del model
    torch.cuda.empty_cache()


def build_qwen25_7b_lm():
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
        vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, num_heads=16,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, torch_dtype=torch.bfloat16)
    return model.eval()


def measure_qwen(args, results):
    """Long context: the language-model prefill at 4K/8K/16K visual tokens, unpruned vs pruned vs
    oracle (the vision tower's own time is measured separately by the kernels benchmark)."""
    import torch

    import vtoken

    model = build_qwen25_7b_lm()
    for visual in args.qwen_visual:
        side = int(round(visual ** 0.5))
        grid = (1, side * 2, side * 2)
        n_vis = side * side
        ids = [151644, 100, 200, 151652] + [151655] * n_vis + [151653] + list(range(300, 332))
        input_ids = torch.tensor([ids], device="cuda")
        tt = torch.tensor([[0] * 4 + [1] * n_vis + [0] * 33], device="cuda")
        embeds = model.model.get_input_embeddings()(input_ids)
        pos = model.model.get_rope_index(input_ids, image_grid_thw=torch.tensor([grid], device="cuda"),
                                         attention_mask=torch.ones_like(input_ids), mm_token_type_ids=tt)[0]

        # the language model alone, fed the image embeddings (random), as the pruning acts there
        def lm_prefill(e=embeds, p=pos):
            with torch.no_grad():
                h = model.model.language_model(inputs_embeds=e, position_ids=p, use_cache=True).last_hidden_state
                return model.lm_head(h[:, -1:])

        t_full = _timed(lm_prefill, args.repeats)
        results.append(dict(model="qwen2.5-vl-7b-lm", batch=1, method="unpruned", keep=1.0, context=len(ids),
                            ttft_ms=round(t_full, 2)))
        print(results[-1], flush=True)
        keep = 0.11
        kept = max(1, round(keep * n_vis))
        idx = torch.cat([torch.arange(4), 4 + torch.linspace(0, n_vis - 1, kept).round().long(),
                         torch.arange(4 + n_vis, len(ids))]).cuda()
        t_oracle = _timed(lambda: lm_prefill(embeds[:, idx], pos[..., idx]), args.repeats)
        results.append(dict(model="qwen2.5-vl-7b-lm", batch=1, method="oracle", keep=keep, context=int(idx.numel()),
                            ttft_ms=round(t_oracle, 2)))
        print(results[-1], flush=True)
        # pruned through the hooks: drive the language model via the multimodal model's hooks
        for method in args.methods:
            handle = vtoken.apply_pruning(model, method=method, keep=keep, backend=args.backend)
            rt = handle.runtime
            from vtoken.adapters.base import layout_from_runs

            def pruned(method=method):
                rt.on_multimodal_call({})
                ctx = rt.ctx
                ctx.layout = layout_from_runs(input_ids == 151655, torch.zeros_like(input_ids),
                                              {0: [n_vis]}, {0: [(1, side, side)]})
                try:
                    return lm_prefill()
                finally:
                    rt.on_multimodal_done()

            t = _timed(pruned, args.repeats)
            if args.profile and visual == max(args.qwen_visual):
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    pruned()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
            handle.remove()
            results.append(dict(model="qwen2.5-vl-7b-lm", batch=1, method=f"{method}[{args.backend}]", keep=keep, context=len(ids),
                                ttft_ms=round(t, 2), speedup_vs_unpruned=round(t_full / t, 2),
                                ratio_to_oracle=round(t / t_oracle, 3)))
            print(results[-1], flush=True)
    del model
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vtoken bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llava,qwen")
    p.add_argument("--batch", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--methods", default="fastv", type=lambda s: s.split(","))
    p.add_argument("--keep", default="192,128,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--qwen-visual", default="4096,8192,16384", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/e2e")
    p.add_argument("--profile", action="store_true", help="print a profile of the longest pruned Qwen prefill")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="scoring-layer attention: auto = fused Triton attend_and_score on CUDA")
    args = p.parse_args(argv)
    import torch
    import transformers
    import triton

    if not torch.cuda.is_available():
        print("vtoken bench needs a CUDA device")
        return 2
    results = []
    models = args.models.split(",")
    if "llava" in models:
        measure_llava(args, results)
    if "qwen" in models:
        measure_qwen(args, results)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                triton=triton.__version__, python=platform.python_version(), attn="sdpa", dtype="bfloat16",
                weights="random", command="vtoken bench " + " ".join(argv if argv is not None else __import__("sys").argv[1:]), repeats=args.repeats,
                new_tokens=args.new_tokens)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    cols = ["model", "batch", "method", "keep", "context", "ttft_ms", "decode_ms_per_token", "tokens_per_s", "kv_cache_mb",
            "peak_mem_gb", "speedup_vs_unpruned", "ratio_to_oracle"]
    lines = [f"# vtoken bench — {meta['device']}", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}; random bf16 weights, "
             f"SDPA; medians of {args.repeats} synchronised runs; command: `{meta['command']}`", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
