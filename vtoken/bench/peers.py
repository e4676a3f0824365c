"""Suite ``peers``: the peers' styles of attention scoring against vtoken, at 4K visual tokens.

LLaVA-1.5-7B (FastV's own model) with 7 images per prompt = 7 x 576 = 4032 visual tokens
(4.1K-token prompt), batch 1, budget 64 tokens per image (448 kept) for every pruned row:

- ``unpruned``: SDPA, no pruning (upper bound of cost).
- ``fastv[auto]``: vtoken FastV (K = 2): the scoring layer's attention and the last row's
  probabilities from one fused ``attend_and_score`` call (Triton on CUDA), tokens dropped at K.
- ``oracle``: the language model fed only the tokens vtoken kept.
- ``peer:fastv-eager-mask``: FastV's released HF path in its attention-mask mode, which keeps
  every token: the whole model in eager attention with ``output_attentions=True`` (every layer's
  N x N weights materialised).
- ``peer:fastv-eager-drop``: FastV's released HF path in its in-place (real drop) mode: the whole
  model in eager attention with ``output_attentions=True``; the tokens are dropped after layer
  K - 1 (by vtoken's re-layout, with the torch scoring backend, so layer K - 1 is the eager
  attention whose weights FastV reads). The best case of that path: its own drop also breaks
  the KV cache, which this emulation does not.
- ``peer:llmc-rerun``: LLMC / LightCompress's path, emulated (see :class:`LayerRerun`): the
  model runs in SDPA; the scoring layer K - 1 is run a SECOND time, in eager attention and
  returning its attention weights, from which the last-token row is averaged over heads (the
  score FastV needs); the tokens are then dropped at K with vtoken's re-layout (LLMC's forward
  pre-hooks gather ``hidden_states[:, keep]`` and rewrite positions / mask equivalently). The
  selection itself comes from vtoken's probe of the first run (the same tokens: speed does not
  depend on which tokens are kept).

Target (issue 8): vtoken's TTFT >= 2x faster than whole-model-eager FastV at 4K visual tokens.
"""

from __future__ import annotations

import copy

import torch

import vtoken
from vtoken.bench import models as M
from vtoken.bench.common import HookOwner, OracleFeed, ModuleTimer, cache_of, kept_positions, kv_bytes, kv_fields, timed, token_counts

N_IMAGES = 7
KEEP = 64  # per image (of 576)


class LayerRerun(HookOwner):
    """LLMC-style scoring emulation: after decoder layer ``layer`` runs in the prefill, run it
    again on the same input in eager attention with attention weights returned (no KV cache
    update), and reduce the weights to the head-averaged last-row score (kept in ``scores``)."""

    def __init__(self, decoder_layer, dtype):
        self.layer = decoder_layer
        self.dtype = dtype
        self.scores = None
        self.reruns = 0
        self._weights = None
        self._busy = False
        self._masks = {}
        self._h = decoder_layer.register_forward_hook(self._after, with_kwargs=True)

    def _causal(self, n, device):
        mask = self._masks.get((n, device))
        if mask is None:
            mask = torch.full((n, n), torch.finfo(self.dtype).min, dtype=self.dtype, device=device).triu(1)[None, None]
            self._masks = {(n, device): mask}
        return mask

    def _capture(self, module, args, output):
        if isinstance(output, tuple) and len(output) > 1:
            self._weights = output[1]

    def _after(self, module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._busy or hidden.shape[1] <= 1:  # the re-run itself, or a decode step (scored once, in the prefill)
            return None
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        for key in ("past_key_values", "cache", "past_key_value"):
            if key in kw:
                kw[key] = None
        kw["use_cache"] = False
        mask = kw.get("attention_mask")
        if mask is None:
            kw["attention_mask"] = self._causal(hidden.shape[1], hidden.device)
        elif mask.dtype == torch.bool:
            kw["attention_mask"] = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min)
        attn = module.self_attn
        saved = attn.config
        eager = copy.copy(saved)
        eager._attn_implementation_internal = "eager"
        attn.config = eager
        h = attn.register_forward_hook(self._capture)
        self._busy = True
        try:
            with torch.no_grad():
                module(hidden, **kw)
        finally:
            self._busy = False
            h.remove()
            attn.config = saved
        w = self._weights
        self._weights = None
        if w is None:
            raise RuntimeError("the eager re-run of the scoring layer returned no attention weights")
        self.scores = w[:, :, -1, :].float().mean(dim=1)  # (B, N): attention the last token pays each key
        self.reruns += 1
        return None


def run_peers(bench, pool, n_images=N_IMAGES, keep=KEEP, method="fastv", K=2):
    suite = "peers"
    model = pool.get("llava-1.5-7b")
    vc = model.config.vision_config
    per = (vc.image_size // vc.patch_size) ** 2
    if bench.tiny:
        keep = max(1, round(keep * per / 576))
    inputs = M.llava_inputs(model, 1, n_images=n_images, device=bench.device, dtype=bench.dtype)
    N = inputs["input_ids"].shape[1]
    lm = model.model.language_model
    visual = n_images * per
    rows = {}

    def prefill(**extra):
        return lambda: model(**inputs, logits_to_keep=1, use_cache=True, **extra)

    def row(method_name, attn, ttft, runs, vis, kv, **more):
        r = dict(suite=suite, model="llava-1.5-7b", batch=1, method=method_name, keep=keep if method_name != "unpruned" and
                 method_name != "peer:fastv-eager-mask" else "all", attn=attn, images=n_images, visual_tokens=visual,
                 context=N, ttft_ms=round(ttft, 2), vision_ms=None if vis is None else round(vis, 2),
                 **kv_fields(kv), peak_mem_gb=bench.peak_gb(), runs=runs)
        r.update(more)
        rows[method_name] = bench.add(**r)
        return rows[method_name]

    with ModuleTimer(bench, model.model.vision_tower) as vt:
        def measure(fn):
            bench.reset_peak()
            t, runs, out = timed(bench, fn, timers=[vt])
            kv = kv_bytes(cache_of(out))
            del out
            return t, runs, vt.median_ms(), kv

        t_full, runs, vis, kv = measure(prefill())
        row("unpruned", "sdpa", t_full, runs, vis, kv, kept_visual=visual, context_after=N)

        with vtoken.apply_pruning(model, method=method, keep=keep, K=K, backend=bench.backend) as handle:
            t_ours, runs, vis, kv = measure(prefill())
            counts = token_counts(handle)
            index = kept_positions(handle)
        row(f"{method}[{bench.backend}]", "sdpa", t_ours, runs, vis, kv, kept_visual=counts["kept_visual"],
            context_after=counts["context_after"], speedup_vs_unpruned=round(t_full / t_ours, 3))

        with OracleFeed(lm, index, N) as feed:
            t_o, runs, vis, kv = measure(prefill())
            fed = feed.fed[-1]
        row("oracle", "sdpa", t_o, runs, vis, kv, kept_visual=counts["kept_visual"], context_after=fed,
            speedup_vs_unpruned=round(t_full / t_o, 3))

        # FastV's released HF path: eager everywhere, attention weights materialised
        M.set_attention(model, "eager")
        try:
            t, runs, vis, _ = measure(lambda: model(**inputs, logits_to_keep=1, output_attentions=True))
            row("peer:fastv-eager-mask", "eager", t, runs, vis, None, kept_visual=visual, context_after=N,
                note="whole model eager + output_attentions, no token dropped (FastV attention-mask mode)")
            if not bench.over_budget():
                with vtoken.apply_pruning(model, method=method, keep=keep, K=K, backend="torch") as handle:
                    t, runs, vis, kv = measure(prefill(output_attentions=True))
                    c = token_counts(handle)
                row("peer:fastv-eager-drop", "eager", t, runs, vis, kv, kept_visual=c["kept_visual"],
                    context_after=c["context_after"],
                    note=f"whole model eager + output_attentions, tokens dropped after layer {K - 1} (FastV in-place mode)")
            else:
                bench.skip(suite, "peer:fastv-eager-drop")
        finally:
            M.set_attention(model, "sdpa")

        if not bench.over_budget():
            with vtoken.apply_pruning(model, method=method, keep=keep, K=K, backend="torch") as handle, \
                    LayerRerun(lm.layers[K - 1], bench.dtype) as rerun:
                t, runs, vis, kv = measure(prefill())
                c = token_counts(handle)
                reruns = rerun.reruns
                scored = None if rerun.scores is None else int(rerun.scores.shape[-1])
            row("peer:llmc-rerun", "sdpa + eager re-run of layer K-1", t, runs, vis, kv, kept_visual=c["kept_visual"],
                context_after=c["context_after"], reruns=reruns, rerun_keys=scored,
                note=f"SDPA model; layer {K - 1} re-run eager with attention weights (LLMC style); drop at layer {K}")
        else:
            bench.skip(suite, "peer:llmc-rerun")

    ours = rows[f"{method}[{bench.backend}]"]
    for name in ("peer:fastv-eager-mask", "peer:fastv-eager-drop", "peer:llmc-rerun"):
        if name in rows:
            ours[f"speedup_vs_{name.split(':', 1)[1]}"] = round(rows[name]["ttft_ms"] / ours["ttft_ms"], 3)
    ours["ratio_to_oracle"] = round(ours["ttft_ms"] / rows["oracle"]["ttft_ms"], 3)
    del inputs
    bench.empty_cache()
    return rows
