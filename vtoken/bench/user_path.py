"""Suite ``users``: what users call — ``model.generate`` — timed as they call it (issue 23, item 5).

For LLaVA-1.5-7B (one 336 px image, 576 visual tokens, 64-token text) and Qwen2.5-VL-7B (one
image of ``--users-qwen-visual`` visual tokens, 32-token text) at each batch size of
``--users-batch``: ``generate`` with the dynamic cache (the default) and with
``cache_implementation="static"`` (transformers compiles its decode step on CUDA, "reduce-overhead":
CUDA graphs), and (``--users-caches compile,compile-fused``) through ``apply_pruning(...,
compile=True)`` / ``compile={"fused_ops": True}`` (vtoken's static engine; unpruned = method
``none``), each unpruned and pruned by ``fastv``, ``divprune`` and ``visionzip`` (LLaVA: 64
visual tokens kept per image; Qwen: ``--qwen-keep`` of them). Per row: TTFT (``generate`` of one
token), end-to-end time of ``--users-new-tokens`` tokens, decode ms/token
((end-to-end - TTFT) / (tokens - 1)), peak memory, and the row's physical floor:

- decode floor: every step reads the language model's weights once (the vision tower and
  projector only run in the prefill) and the keys/values of the tokens in context
  (on average the prefill's kept tokens per layer plus half the new tokens), at the HBM bandwidth
  (an H100's 3.35 TB/s; an H200's 4.8 TB/s on one);
- TTFT floor: the larger of the prefill's FLOPs (2 x parameters x tokens per layer, the vision
  tower's 2 x parameters x patches, attention's 4 x tokens^2 x width per layer) at the dense bf16
  peak and one read of the weights at the bandwidth.

A compiled static decode is compiled (and its CUDA graphs recorded) by the first call of each
shape: every row is warmed up with the same call before it is timed (on the dynamic cache, where
nothing is compiled, with a 2-token call).
"""

from __future__ import annotations

import vtoken
from vtoken.bench import models as M
from vtoken.bench.common import timed

#: H100 SXM: HBM3 bandwidth (bytes/s) and dense bf16 tensor-core peak (FLOP/s), as the issue's floors
HBM_BYTES_S = 3.35e12
PEAK_FLOPS = 790e12
#: the H200's HBM3e (the same compute)
H200_HBM_BYTES_S = 4.8e12


def hbm_bytes_s(device) -> float:
    """The memory bandwidth the floors use: the H200's where the device is one, else the H100's."""
    import torch

    on_cuda = torch.cuda.is_available() and torch.device(device).type == "cuda"
    name = torch.cuda.get_device_name(device) if on_cuda else ""
    return H200_HBM_BYTES_S if "H200" in name and "GH200" not in name else HBM_BYTES_S
METHODS = (None, "fastv", "divprune", "visionzip")
#: ``--users-caches`` that route ``generate`` through ``apply_pruning(..., compile=...)`` (the static engine)
_COMPILE_CACHES = {"compile": True, "compile-fused": {"fused_ops": True}}
#: every ``--users-caches`` name
CACHES = ("dynamic", "static", *_COMPILE_CACHES)


def _repeat(inputs: dict, batch: int) -> dict:
    """A batch-1 Qwen prompt repeated ``batch`` times (its image repeated with it)."""
    out = {}
    for k, v in inputs.items():
        if k in ("pixel_values", "image_grid_thw"):
            out[k] = v.repeat(batch, *([1] * (v.dim() - 1)))
        else:
            out[k] = v.expand(batch, *v.shape[1:]).contiguous()
    return out


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _floors(model, inputs, text_lm, vision, kept: list, new_tokens: int, bytes_per=2, bandwidth=HBM_BYTES_S) -> dict:
    """(TTFT floor ms, decode floor ms/token) of a prefill whose layer ``l`` holds ``kept[l]``
    tokens per sample (the prompt before the first stage, the kept tokens after), at ``bandwidth``
    bytes/s."""
    B = inputs["input_ids"].shape[0]
    cfg = text_lm.config
    layers = len(kept)
    per_layer = (_params(text_lm) - _params(text_lm.embed_tokens)) / layers
    width = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    flops = sum(2 * per_layer * n * B + 4 * n * n * width * B for n in kept)
    pix = inputs.get("pixel_values")
    patches = pix.shape[0] * (pix.shape[2] * pix.shape[3] // vision.config.patch_size ** 2 + 1) if pix is not None \
        and pix.dim() == 4 else (pix.shape[0] if pix is not None else 0)
    flops += 2 * _params(vision) * patches
    weights = (_params(model) - _params(text_lm.embed_tokens)) * bytes_per
    ttft = max(flops / PEAK_FLOPS, weights / bandwidth) * 1e3
    step_weights = weights - (_params(model) - _params(text_lm) - _lm_head(model)) * bytes_per
    kv_per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * bytes_per
    kv = sum((n + new_tokens / 2) * kv_per_token * B for n in kept)
    return dict(ttft_floor_ms=round(ttft, 2), decode_floor_ms=round((step_weights + kv) / bandwidth * 1e3, 2))


def _lm_head(model) -> int:
    head = model.get_output_embeddings()
    return 0 if head is None else _params(head)


def _kept_per_layer(handle, n_layers: int, prompt: int) -> list:
    """Tokens per sample each layer holds after the prefill (the longest row), from the handle's stats."""
    if handle is None:
        return [prompt] * n_layers
    stats = handle.stats
    out, n = [], prompt
    stage_at = {st.layer: st for st in stats.stages}
    for layer in range(n_layers):
        st = stage_at.get(layer)
        if st is not None:
            n = max(prompt - stats.visual_tokens[b] + int(st.kept[b].numel()) for b in range(len(stats.visual_tokens)))
        out.append(n)
    return out


def measure(bench, suite, model_name, model, inputs, keep, new_tokens: int, methods=METHODS, caches=("dynamic", "static")):
    """One row per (cache, method) of ``model`` on ``inputs``."""
    text_lm = model.model.language_model
    vision = getattr(model.model, "vision_tower", None) or model.model.visual
    vision = getattr(vision, "vision_model", vision)
    B, P = inputs["input_ids"].shape
    rows = []
    for cache in caches:
        extra = dict(cache_implementation="static") if cache == "static" else {}
        engine = _COMPILE_CACHES.get(cache)
        if bench.tiny and cache == "static":  # the path, not the speed: dynamo's tracing without inductor
            from transformers import CompileConfig

            cc = CompileConfig(backend="eager", fullgraph=True)
            cc._compile_all_devices = True
            extra["compile_config"] = cc
        for method in methods:
            label = method or "unpruned"
            if bench.over_budget(30):
                bench.skip(suite, f"{model_name} batch {B} {cache} {label}")
                continue
            handle = None
            try:
                if engine is not None:  # unpruned on the engine: the keep-everything method "none"
                    handle = vtoken.apply_pruning(model, method=method or "none", keep=keep, backend=bench.backend,
                                                  compile=engine)
                elif method is not None:
                    handle = vtoken.apply_pruning(model, method=method, keep=keep, backend=bench.backend)

                def gen(n, _extra=extra):
                    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **_extra)

                # compiles / records a static decode of this shape; the dynamic cache has nothing to
                # compile, so a short call warms its kernels
                gen(new_tokens if cache != "dynamic" else 2)
                bench.reset_peak()
                e2e, _, _ = timed(bench, lambda: gen(new_tokens), warmup=0)
                peak = bench.peak_gb()
                ttft, _, _ = timed(bench, lambda: gen(1))
                kept = _kept_per_layer(handle, len(text_lm.layers), P)
                rows.append(bench.add(
                    suite=suite, model=model_name, batch=B, cache=cache, method=label,
                    keep=None if method is None else keep, prompt_tokens=P, kept_tokens_last_layer=kept[-1],
                    ttft_ms=round(ttft, 2), e2e_ms=round(e2e, 2), new_tokens=new_tokens,
                    decode_ms_per_token=round((e2e - ttft) / max(new_tokens - 1, 1), 3), peak_gb=peak,
                    **_floors(model, inputs, text_lm, vision, kept, new_tokens, bandwidth=hbm_bytes_s(bench.device))))
            except Exception as exc:  # one failing row must not cost the others
                msg = f"{suite}: {model_name} batch {B} {cache} {label}: {type(exc).__name__}: {exc}"
                bench.errors.append(msg.replace("\n", " ")[:800])
                bench.log("ERROR " + msg)
            finally:
                if handle is not None:
                    handle.remove()
                bench.empty_cache()
    return rows


def run_users(bench, pool, batches, qwen_visual: int, qwen_keep: float, new_tokens: int, models=("llava", "qwen"),
              methods=("unpruned", "fastv", "divprune", "visionzip"), caches=("dynamic", "static")):
    """The suite: LLaVA-1.5-7B then Qwen2.5-VL-7B at each batch size. Each (batch, method) gives
    the compiled decode step new cache shapes: dynamo recompiles (after the first change with
    symbolic sizes), more often than its default limit of 8 allows, past which transformers'
    compiled call would silently fall back to eager; the limit is raised for the run. Qwen rows
    leave out ``visionzip``: vtoken maps encoder attention to LLM tokens on CLIP towers only."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    methods = tuple(None if m == "unpruned" else m for m in methods)
    if "llava" in models:
        model = pool.get("llava-1.5-7b")
        for B in batches:
            inputs = M.llava_inputs(model, B, device=bench.device, dtype=bench.dtype)
            measure(bench, "users", "llava-1.5-7b", model, inputs, 64 if not bench.tiny else 8, new_tokens, methods,
                    caches)
        del model
        pool.release("llava-1.5-7b")
    if "qwen" in models:
        model = pool.get("qwen2.5-vl-7b")
        side = max(2, int(round((qwen_visual * 4) ** 0.5 / 2)) * 2) if not bench.tiny else 16
        one = M.qwen_inputs(model, 1, (1, side, side), device=bench.device, dtype=bench.dtype)
        for B in batches:
            measure(bench, "users", "qwen2.5-vl-7b", model, _repeat(one, B), qwen_keep, new_tokens,
                    tuple(m for m in methods if m != "visionzip"), caches)
    for line in ratio_lines(bench.rows):
        bench.log(line)


def ratio_lines(rows: list) -> list:
    """The issue's ratios from one run's rows: pruned / unpruned per (model, batch, cache)."""
    by = {(r["model"], r["batch"], r["cache"], r["method"]): r for r in rows if r.get("suite") == "users"}
    lines = []
    for (model, B, cache, method), r in sorted(by.items()):
        base = by.get((model, B, cache, "unpruned"))
        static_base = by.get((model, B, "static", "unpruned"))
        if base is None or method == "unpruned":
            continue
        lines.append(
            f"{model} batch {B} {cache} {method}: TTFT x{r['ttft_ms'] / base['ttft_ms']:.2f}, decode "
            f"x{r['decode_ms_per_token'] / base['decode_ms_per_token']:.2f} (floor {r['decode_floor_ms']} ms), "
            f"e2e x{r['e2e_ms'] / base['e2e_ms']:.2f}"
            + (f", e2e / static unpruned x{r['e2e_ms'] / static_base['e2e_ms']:.2f}" if static_base else ""))
    return lines
