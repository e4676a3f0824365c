"""What the probes record during a pruning prefill: attention rows and keys of the LLM layers
before a stage, and the vision encoder's attention per image.

:func:`probe_rows` reads the signal contract (:data:`vtoken.signals.SIGNALS`: each signal's
``probe`` captures, at the layer before its stage or at every layer before it) and says which
layers to probe for what. :func:`layer_probe` and :func:`vision_probe` build the functions that
:func:`vtoken.hooks.probe.install_probe` routes a layer's attention through; they write into the
call's :class:`vtoken.hooks.call_state.CallContext` (``ctx.attn[layer]``) or the runtime's
thread-local pending vision captures, which :mod:`vtoken.hooks.stage_signals` reads.
"""

from __future__ import annotations

import torch

from vtoken.hooks.checkpointing import outside_recompute
from vtoken.hooks.probe import attention_rows
from vtoken.hooks.stage_signals import last_valid, text_slots
from vtoken.signals import SIGNALS

#: the hook bodies run eagerly under ``torch.compile`` (a graph break at each): they read host
#: copies, thread-local state and Python lists that a traced graph must not bake in
eager = torch.compiler.disable


def probe_rows(plan) -> dict:
    """layer -> set of captures to record there ("last", "text", "keys", "full"), from the
    signals the plan's scorers declare in ``needs``."""
    from vtoken.errors import PruningConfigError

    rows = {}
    for st in plan:
        for name in sorted(getattr(st.scorer, "needs", frozenset())):
            signal = SIGNALS.get(name)
            if signal is None or not signal.probe:
                continue
            if st.layer == 0:
                raise PruningConfigError(
                    f"scorer {st.scorer.name!r} needs attention rows of the layer before its stage; "
                    "it cannot run at layer 0 (before the LLM): use layer >= 1"
                )
            for layer in range(st.layer) if signal.every_layer else (st.layer - 1,):
                rows.setdefault(layer, set()).update(signal.probe)
    return rows


def layer_probe(rt, layer: int, needs: set):
    """The attention function of LLM layer ``layer``, probed for ``needs`` (see :func:`probe_rows`).

    During a pruning prefill it returns the layer's attention output AND records the softmax
    rows the next stage needs into ``ctx.attn[layer]``: "last" (B, H, 1, N), "text" (B, H, T, N),
    "full" (B, N, N) head-averaged, "keys" (B, Hkv, N, D). With the Triton backend (CUDA) output
    and rows come from one fused ``attend_and_score`` call; otherwise the model's own attention
    runs and the rows are computed from the same queries and keys (O(rows x N)).
    """
    want_rows = bool(needs & {"last", "text", "full"})

    def run(base, module, query, key, value, attention_mask, **kw):
        ctx = rt.ctx
        if ctx is None or ctx.mode != "prefill" or query.shape[2] != ctx.cur_pos.shape[1]:
            return base(module, query, key, value, attention_mask, **kw)
        rec = ctx.attn.setdefault(layer, {})
        valid = ctx.cur_valid
        base_key, base_value = key, value
        if key.shape[2] > query.shape[2]:  # a fixed-slot cache's layer: the prefill's keys, then empty slots
            key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
        parts = []
        if "last" in needs:  # the last valid slot of each row (from the host plan on the original layout)
            last = ctx.prepared.last_valid if ctx.prepared is not None and not ctx.relaid else None
            parts.append(("last", last_valid(valid).unsqueeze(1) if last is None else last))
        if "text" in needs:
            parts.append(("text", text_slots(ctx)[0]))
        if "full" in needs:
            parts.append(("full", torch.arange(valid.shape[1], device=valid.device).expand(valid.shape[0], -1)))
        rows = (parts[0][1] if len(parts) == 1 else torch.cat([r for _, r in parts], dim=1)) if parts else None
        # the fused kernel has no backward: with gradients the model's attention runs, rows on the side
        use_kernel = want_rows and key.shape[2] == query.shape[2] and rt.kernel_backend(query) == "triton" and not (
            torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
        if use_kernel:
            from vtoken.kernels import attend_and_score

            out, probs = attend_and_score(query, key, value, score_rows=rows, key_padding_mask=valid,
                                          scale=module.scaling, average_heads=False, backend="triton")
            out = out.transpose(1, 2).contiguous()
            result = (out, None)
        else:
            result = base(module, query, base_key, base_value, attention_mask, **kw)
            with outside_recompute():  # a checkpointed layer's recomputation runs no probe
                probs = attention_rows(query, key, rows, valid, module.scaling) if rows is not None else None
        start = 0
        for name, r in parts:
            rec[name] = probs[:, :, start: start + r.shape[1]]
            start += r.shape[1]
        if "full" in rec:
            rec["full"] = rec["full"].mean(dim=1)  # (B, N, N) head-averaged
        if "keys" in needs:
            rec["keys"] = key
        return result

    return eager(run)


def vision_probe(rt):
    """Attention function of the probed vision-encoder layer: records, per image, the encoder
    attention each LLM visual token receives and its keys (the adapter's ``vision_signals``),
    pending until the language model's call of the same forward takes them."""

    def run(base, module, query, key, value, attention_mask, **kw):
        out = base(module, query, key, value, attention_mask, **kw)
        scaling = getattr(module, "scaling", None) or getattr(module, "scale", None) or query.shape[-1] ** -0.5
        pending = getattr(rt.tls, "vision", None)
        if pending is None:
            pending = rt.tls.vision = []
        pending.extend(rt.adapter.vision_signals(query, key, scaling))
        return out

    return eager(run)
