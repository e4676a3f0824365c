"""Suites ``llava`` (LLaVA-1.5-7B) and ``llava-next`` (LLaVA-NeXT-7B, anyres).

Per batch size: the unpruned model, then for each budget the pruned model (``apply_pruning``)
and the ORACLE fed exactly the tokens the pruned run kept (:class:`OracleFeed`). Columns: TTFT
(one prefill forward, vision tower included, last logit only), vision-tower time inside it,
decode ms/token (``generate`` of ``new_tokens`` tokens minus TTFT, per token), tokens/s, KV-cache
bytes after the prefill, peak memory.

Budgets. LLaVA-1.5: ``keep`` = 192 / 128 / 64 visual tokens per image (of 576). LLaVA-NeXT:
an image is one segment of 2880 prunable tokens (5 crops of 576; the 48 image-newline tokens are
structural, never pruned nor counted), so the budgets are the FRACTIONS 192/576, 128/576, 64/576
of each image's prunable tokens = the same 192 / 128 / 64 tokens per 576-token crop equivalent
(960 / 640 / 320 of 2880 for a 672 x 672 image).
"""

from __future__ import annotations


import vtoken
from vtoken.bench import models as M
from vtoken.bench.common import OracleFeed, ModuleTimer, cache_of, kept_positions, kv_bytes, kv_fields, timed, token_counts

FULL_BUDGETS = (192, 128, 64)  # tokens per 576-token image (crop) equivalent


def vision_module(model):
    mm = model.model
    return getattr(mm, "vision_tower", None) or getattr(mm, "visual")


def measure_family(bench, suite, model_name, model, inputs, budgets, *, method="fastv", decode_keeps=(),
                   decode_unpruned=True, extra=None):
    """Unpruned, then pruned + oracle rows for each ``(label, keep)`` of ``budgets``.

    Returns {"unpruned": row, label: {"pruned": row, "oracle": row}}.
    """
    extra = dict(extra or {})
    B, N = inputs["input_ids"].shape
    image_id = model.config.image_token_id
    visual = int((inputs["input_ids"][0] == image_id).sum())
    lm = model.model.language_model
    T = bench.new_tokens
    out_rows = {}

    def prefill():
        return model(**inputs, logits_to_keep=1, use_cache=True)

    def decode_ms(ttft):
        def gen():
            return model.generate(**inputs, max_new_tokens=T, min_new_tokens=T, do_sample=False,
                                  return_dict_in_generate=True)

        total, _, _ = timed(bench, gen, repeats=max(2, bench.repeats - 1))
        return (total - ttft) / max(1, T - 1)

    def row(method_name, keep, ttft, runs, vision, kv, peak, dec=None, **more):
        r = dict(suite=suite, model=model_name, batch=B, method=method_name, keep=keep, attn=M.attention_of(model),
                 ttft_ms=round(ttft, 2), vision_ms=None if vision is None else round(vision, 2),
                 decode_ms_per_token=None if dec is None else round(dec, 2),
                 tokens_per_s=None if dec is None else round(1000.0 * B / dec, 1),
                 **kv_fields(kv), peak_mem_gb=peak, runs=runs,
                 new_tokens=T if dec is not None else None, **extra)
        r.update(more)
        return bench.add(**r)

    with ModuleTimer(bench, vision_module(model)) as vt:
        bench.reset_peak()
        ttft, runs, out = timed(bench, prefill, timers=[vt])
        kv = kv_bytes(cache_of(out))
        del out
        vis_ms, peak = vt.median_ms(), bench.peak_gb()  # peak memory of the prefill runs (not of generate)
        dec = decode_ms(ttft) if decode_unpruned else None
        base = row("unpruned", "all", ttft, runs, vis_ms, kv, peak, dec, visual_tokens=visual, kept_visual=visual,
                   context=N, context_after=N)
        out_rows["unpruned"] = base
        for label, keep in budgets:
            if bench.over_budget():
                bench.skip(suite, f"{model_name} batch {B} keep {label} and later")
                break
            with vtoken.apply_pruning(model, method=method, keep=keep, backend=bench.backend) as handle:
                bench.reset_peak()
                ttft, runs, out = timed(bench, prefill, timers=[vt])
                kv = kv_bytes(cache_of(out))
                del out
                vis_ms, peak = vt.median_ms(), bench.peak_gb()
                counts = token_counts(handle)
                index = kept_positions(handle)
                dec = decode_ms(ttft) if label in decode_keeps else None
                pruned = row(f"{method}[{bench.backend}]", label, ttft, runs, vis_ms, kv, peak, dec, keep_arg=keep,
                             speedup_vs_unpruned=round(base["ttft_ms"] / ttft, 3), **counts)
            with OracleFeed(lm, index, N) as feed:
                bench.reset_peak()
                ttft_o, runs, out = timed(bench, prefill, timers=[vt])
                kv = kv_bytes(cache_of(out))
                del out
                fed = feed.fed[-1]
            oracle = row("oracle", label, ttft_o, runs, vt.median_ms(), kv, bench.peak_gb(), visual_tokens=visual,
                         kept_visual=counts["kept_visual"], context=N, context_after=fed,
                         speedup_vs_unpruned=round(base["ttft_ms"] / ttft_o, 3))
            pruned["ratio_to_oracle"] = round(pruned["ttft_ms"] / ttft_o, 3)
            out_rows[label] = {"pruned": pruned, "oracle": oracle}
    return out_rows


def eager_peer_row(bench, suite, model_name, model, inputs, extra=None):
    """FastV's released HF path without dropping (its attention-mask mode): the whole model in
    eager attention with ``output_attentions=True`` (every layer's N x N weights materialised)."""
    B, N = inputs["input_ids"].shape
    M.set_attention(model, "eager")
    try:
        def eager_scored():
            return model(**inputs, logits_to_keep=1, output_attentions=True)

        with ModuleTimer(bench, vision_module(model)) as vt:
            bench.reset_peak()
            ttft, runs, out = timed(bench, eager_scored, timers=[vt])
            del out
            vis = vt.median_ms()
    finally:
        M.set_attention(model, "sdpa")
    return bench.add(suite=suite, model=model_name, batch=B, method="peer:fastv-eager-mask", keep="all", attn="eager",
                     ttft_ms=round(ttft, 2), vision_ms=None if vis is None else round(vis, 2),
                     peak_mem_gb=bench.peak_gb(), runs=runs, context=N, context_after=N, **(extra or {}))


def scaled_budgets(bench, model, keeps=FULL_BUDGETS):
    """LLaVA-1.5 budgets [(label, keep int per image)]; tiny models scale k of 576 to their grid."""
    vc = model.config.vision_config
    per = (vc.image_size // vc.patch_size) ** 2
    if not bench.tiny:
        return [(k, k) for k in keeps]
    return [(k, max(1, round(k * per / 576))) for k in keeps]


def run_llava(bench, pool, batches=(1, 8, 32), keeps=FULL_BUDGETS, method="fastv"):
    """Suite ``llava``: LLaVA-1.5-7B at each batch size; the eager FastV-style peer at batch 1."""
    model = pool.get("llava-1.5-7b")
    budgets = scaled_budgets(bench, model, keeps or FULL_BUDGETS)
    for B in batches:
        if bench.over_budget():
            bench.skip("llava", f"batch {B} and later")
            break
        inputs = M.llava_inputs(model, B, device=bench.device, dtype=bench.dtype)
        measure_family(bench, "llava", "llava-1.5-7b", model, inputs, budgets, method=method,
                       decode_keeps={budgets[-1][0]})
        if B == 1:
            eager_peer_row(bench, "llava", "llava-1.5-7b", model, inputs)
        del inputs
        bench.empty_cache()


def run_llava_next(bench, pool, batches=(1, 8)):
    """Suite ``llava-next``: LLaVA-NeXT-7B (vicuna), one 672 x 672 image per sample (anyres 2x2:
    5 crops, 2928 image tokens incl. 48 newlines), batch 1 and 8."""
    model = pool.get("llava-next-7b")
    budgets = [(f"{k}/576", k / 576) for k in FULL_BUDGETS]
    for B in batches:
        if bench.over_budget():
            bench.skip("llava-next", f"batch {B} and later")
            break
        inputs = M.llava_next_inputs(model, B, device=bench.device, dtype=bench.dtype)
        measure_family(bench, "llava-next", "llava-next-7b", model, inputs, budgets,
                       decode_keeps={label for label, _ in budgets},
                       extra=dict(image_size=list(inputs["image_sizes"][0].tolist()),
                                  crops=int(inputs["pixel_values"].shape[1])))
        del inputs
        bench.empty_cache()
