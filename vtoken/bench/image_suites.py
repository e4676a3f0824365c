"""Suites ``llava`` (LLaVA-1.5-7B) and ``llava-next`` (LLaVA-NeXT-7B, anyres).

Per batch size: the unpruned model, then for each budget the pruned model (``apply_pruning``)
and the ORACLE fed exactly the tokens the pruned run kept (:class:`OracleFeed`). Columns: TTFT
(one prefill forward, vision tower included, last logit only), vision-tower time inside it,
decode ms/token (``generate`` of ``new_tokens`` tokens minus ``generate`` of one, per step), tokens/s, KV-cache
bytes after the prefill, peak memory.

Budgets. LLaVA-1.5: ``keep`` = 192 / 128 / 64 visual tokens per image (of 576). LLaVA-NeXT:
an image is one segment of 2880 prunable tokens (5 crops of 576; the 48 image-newline tokens are
structural, never pruned nor counted), so the budgets are the FRACTIONS 192/576, 128/576, 64/576
of each image's prunable tokens = the same 192 / 128 / 64 tokens per 576-token crop equivalent
(960 / 640 / 320 of 2880 for a 672 x 672 image).
"""

from __future__ import annotations

import contextlib
import statistics

import torch

import vtoken
from vtoken.bench import models as M
from vtoken.bench.common import (OracleFeed, ModuleTimer, cache_of, kept_positions, kv_bytes, kv_fields, timed,
                                 timed_interleaved, token_counts, paired_ratio, rounds_for)

FULL_BUDGETS = (192, 128, 64)  # tokens per 576-token image (crop) equivalent


def vision_module(model):
    mm = model.model
    return getattr(mm, "vision_tower", None) or getattr(mm, "visual")


def measure_family(bench, suite, model_name, model, inputs, budgets, *, methods=("fastv",), decode_keeps=(),
                   decode_unpruned=True, extra=None, visual_token_id=None, refusals_skipped=False):
    """Unpruned (once), then for each method of ``methods`` the pruned + oracle rows of each
    ``(label, keep)`` of ``budgets``; decode ms/token for the budgets in ``decode_keeps``. A method
    that raises is logged in ``bench.errors`` and the other methods still run; with
    ``refusals_skipped``, a :class:`~vtoken.errors.VTokenError` (vtoken refusing the method on
    these inputs, e.g. a signal the model does not give for a video) is instead one row
    ``{"method": method, "skipped": reason}``. Multi-stage presets whose stage layers do not fit a
    shallow (tiny) model get :func:`vtoken.methods.depth_scaled_options`. ``visual_token_id``: the
    placeholder counted as visual (default the model's ``image_token_id``).

    Returns {"unpruned": row, method: {label: {"pruned": row, "oracle": row}} or the skipped row}.
    """
    from vtoken.errors import VTokenError

    run = _FamilyRun(bench, suite, model_name, model, inputs, extra, visual_token_id)
    with ModuleTimer(bench, vision_module(model)) as run.vt:
        out_rows = {"unpruned": run.unpruned(decode_unpruned)}
        for method in methods:
            try:
                out_rows[method] = {label: run.pruned_and_oracle(method, label, keep, label in decode_keeps)
                                    for label, keep in run.within_budget(budgets, method)}
            except Exception as exc:  # one failing method must not cost the other methods' rows
                msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
                if refusals_skipped and isinstance(exc, VTokenError):
                    out_rows[method] = bench.add(suite=suite, model=model_name, batch=run.B, method=method,
                                                 keep=budgets[0][0] if len(budgets) == 1 else None,
                                                 skipped=msg[:400], **run.extra)
                else:
                    bench.errors.append(f"{suite}: {model_name} batch {run.B} {method}: {msg}"[:800])
                    bench.log(f"ERROR {suite}: {model_name} batch {run.B} {method}: {msg}")
                bench.empty_cache(collect=True)
    return out_rows


class _FamilyRun:
    """The measurements of :func:`measure_family` on one (model, inputs)."""

    def __init__(self, bench, suite, model_name, model, inputs, extra, visual_token_id=None):
        self.bench, self.suite, self.model_name, self.model, self.inputs = bench, suite, model_name, model, inputs
        self.extra = dict(extra or {})
        self.B, self.N = inputs["input_ids"].shape
        token = model.config.image_token_id if visual_token_id is None else visual_token_id
        self.visual = int((inputs["input_ids"][0] == token).sum())
        self.lm = model.model.language_model
        self.T = bench.new_tokens
        self.vt = None  # ModuleTimer of the vision module, set by measure_family
        self.base = None

    def prefill(self):
        return self.model(**self.inputs, logits_to_keep=1, use_cache=True)

    def decode_ms(self):
        """ms per decode step: ``generate`` of T tokens minus ``generate`` of 1 token, timed in
        interleaved rounds (median of the per-round differences, so host drift between the two
        cancels), over the T - 1 steps."""
        T = self.T

        def gen(n):
            return lambda: self.model.generate(**self.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                               return_dict_in_generate=True)

        # 2 rounds were too few on a shared host (eager decode is launch-bound: the host's load is
        # the noise); benchmarks/profile/decode_overhead.py uses 7
        long, short = timed_interleaved(self.bench, [(contextlib.nullcontext, gen(T)), (contextlib.nullcontext, gen(1))],
                                        max(5, self.bench.repeats))
        return statistics.median(a - b for a, b in zip(long, short)) / max(1, T - 1)

    def timed_prefill(self):
        """(ttft ms, runs, kv bytes, vision ms, peak GB) of the prefill as the model stands now."""
        self.bench.reset_peak()
        ttft, runs, out = timed(self.bench, self.prefill, timers=[self.vt])
        kv = kv_bytes(cache_of(out))
        del out
        return ttft, runs, kv, self.vt.median_ms(), self.bench.peak_gb()

    def row(self, method_name, keep, ttft, runs, vision, kv, peak, dec=None, **more):
        r = dict(suite=self.suite, model=self.model_name, batch=self.B, method=method_name, keep=keep,
                 attn=M.attention_of(self.model), ttft_ms=round(ttft, 2),
                 vision_ms=None if vision is None else round(vision, 2),
                 decode_ms_per_token=None if dec is None else round(dec, 2),
                 tokens_per_s=None if dec is None else round(1000.0 * self.B / dec, 1),
                 **kv_fields(kv), peak_mem_gb=peak, runs=runs,
                 new_tokens=self.T if dec is not None else None, **self.extra)
        r.update(more)
        return self.bench.add(**r)

    def unpruned(self, decode):
        ttft, runs, kv, vis_ms, peak = self.timed_prefill()  # peak memory of the prefill runs (not of generate)
        dec = self.decode_ms() if decode else None
        self.base = self.row("unpruned", "all", ttft, runs, vis_ms, kv, peak, dec, visual_tokens=self.visual,
                             kept_visual=self.visual, context=self.N, context_after=self.N)
        return self.base

    def within_budget(self, budgets, method):
        for label, keep in budgets:
            if self.bench.over_budget():
                self.bench.skip(self.suite, f"{self.model_name} batch {self.B} {method} keep {label} and later")
                return
            yield label, keep

    def pruned_and_oracle(self, method, label, keep, decode):
        """Pruned and oracle rows of one budget. KV bytes, peak memory, token counts and decode come
        from runs of each alone; the two TTFTs (and their ratio) from interleaved rounds
        (:func:`timed_interleaved`)."""
        from vtoken.bench.learned_weights import bench_weights
        from vtoken.methods import depth_scaled_options

        options = {**depth_scaled_options(method, len(self.lm.layers)), **bench_weights(method, self.model)}

        def pruning():
            return vtoken.apply_pruning(self.model, method=method, keep=keep, backend=self.bench.backend, **options)

        with pruning() as handle:
            alone, _, kv, vis_ms, peak = self.timed_prefill()
            counts, index = token_counts(handle), kept_positions(handle)
            dec = self.decode_ms() if decode else None
        with OracleFeed(self.lm, index, self.N) as feed:
            self.bench.reset_peak()
            with torch.no_grad():
                out = self.prefill()
            kv_o, peak_o, fed = kv_bytes(cache_of(out)), self.bench.peak_gb(), feed.fed[-1]
            del out
        rounds = rounds_for(alone, self.bench.repeats)
        times, times_o = timed_interleaved(self.bench, [(pruning, self.prefill),
                                                        (lambda: OracleFeed(self.lm, index, self.N), self.prefill)], rounds)
        ttft, ttft_o = statistics.median(times), statistics.median(times_o)
        pruned = self.row(f"{method}[{self.bench.backend}]", label, ttft, rounds, vis_ms, kv, peak, dec,
                          keep_arg=keep, speedup_vs_unpruned=round(self.base["ttft_ms"] / ttft, 3),
                          ratio_to_oracle=round(paired_ratio(times, times_o), 3), ttft_alone_ms=round(alone, 2), **counts)
        oracle = self.row("oracle", label, ttft_o, rounds, None, kv_o, peak_o, visual_tokens=self.visual,
                          kept_visual=counts["kept_visual"], context=self.N, context_after=fed,
                          speedup_vs_unpruned=round(self.base["ttft_ms"] / ttft_o, 3))
        return {"pruned": pruned, "oracle": oracle}

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


def run_llava(bench, pool, batches=(1, 8, 32), keeps=FULL_BUDGETS, methods=("fastv",)):
    """Suite ``llava``: LLaVA-1.5-7B at each batch size; the eager FastV-style peer at batch 1."""
    model = pool.get("llava-1.5-7b")
    budgets = scaled_budgets(bench, model, keeps or FULL_BUDGETS)
    for B in batches:
        if bench.over_budget():
            bench.skip("llava", f"batch {B} and later")
            break
        inputs = M.llava_inputs(model, B, device=bench.device, dtype=bench.dtype)
        measure_family(bench, "llava", "llava-1.5-7b", model, inputs, budgets, methods=methods,
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
