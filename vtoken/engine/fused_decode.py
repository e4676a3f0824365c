"""The decoder layers of a static decode step (and of the captured prefill tail) with fused element-wise ops (opt-in).

``StaticDecoder(model, fused_ops=True)`` runs each decode step's layers through :func:`run_layers`
instead of the model's own layer ``forward``: the same sub-modules (the projections are the
model's ``nn.Linear`` s, the attention is :func:`vtoken.kernels.gather_attend` over the static
buffers as before), with the element-wise work between them done by
:mod:`vtoken.kernels.decode_ops`: the residual add and RMSNorm in one kernel, the rotary embedding
of q and k in one, SiLU times the up projection in one (about 40 kernels per layer become about
16). With the PyTorch references (CPU) the step computes exactly what the model's layers compute;
with the Triton kernels the norm and the gate may differ from ``transformers`` by one bfloat16
rounding step, which can flip a greedy near-tie.

Which layers qualify (:func:`unsupported_reason`): the Llama layer classes (LLaVA-1.5 / LLaVA-NeXT's
Vicuna and Mistral, Qwen2-VL / Qwen2.5-VL's Qwen2; not Granite, whose layers have the same parts but
scale each residual branch) with exactly ``self_attn`` (``q/k/v/o_proj``),
``mlp`` (``gate/up/down_proj``, SiLU), ``input_layernorm`` and ``post_attention_layernorm``
(RMSNorm with ``variance_epsilon``), half-split rotary. Anything else (Qwen3's q/k norms, for one)
keeps the model's own layers.

Shapes: hidden ``[B, 1, D]``; cos / sin ``[B, 1, Dh]`` (for M-RoPE ``[3, B, 1, Dh]``, whose
three components are equal for a decode token, so the first one is the merged table). The prefill
tail (:func:`run_prefill_layers`) runs the same layers on ``[B, S, D]`` with the model's own
attention function over the keys / values just written, where the rotary tables are ``[B, S, Dh]``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from vtoken.kernels import gather_attend
from vtoken.kernels.gemv import skinny_linear
from vtoken.kernels.merged_linear import run_linear
from vtoken.engine.static_kv import StaticKV
from vtoken.kernels.decode_ops import add_rms_norm, is_rms_norm, rope_qk, rope_qk_store, silu_mul

_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "act_fn"}


# the layer classes whose forward is the Llama one run_layers reproduces (a layer with the same
# sub-modules can still compute something else: Granite scales each residual branch)
_KNOWN_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen2VLDecoderLayer",
                 "Qwen2_5_VLDecoderLayer")
_SCALING_FIELDS = ("residual_multiplier", "embedding_multiplier", "attention_multiplier")


def unsupported_reason(layers, final_norm, config) -> Optional[str]:
    """None when every layer has the Llama layout described above; else why not."""
    names = sorted({type(layer).__name__ for layer in layers} - set(_KNOWN_LAYERS))
    if names:
        return f"layer class {names[0]} is not one of {', '.join(_KNOWN_LAYERS)}"
    scaled = [f for f in _SCALING_FIELDS if getattr(config, f, None) not in (None, 1, 1.0)]
    if scaled:
        return f"the text config scales activations ({', '.join(scaled)})"
    act = getattr(config, "hidden_act", None)
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r} (the fused gate is SiLU)"
    if not is_rms_norm(final_norm):
        return f"final norm {type(final_norm).__name__} is not an RMSNorm with variance_epsilon"
    for i, layer in enumerate(layers):
        parts = {name for name, _ in layer.named_children()}
        if parts != _LAYER_PARTS:
            return f"layer {i} has sub-modules {sorted(parts)}, not {sorted(_LAYER_PARTS)}"
        attn_parts = {name for name, _ in layer.self_attn.named_children()}
        if attn_parts != _ATTN_PARTS:
            return f"layer {i} attention has sub-modules {sorted(attn_parts)}, not {sorted(_ATTN_PARTS)}"
        mlp_parts = {name for name, _ in layer.mlp.named_children()}
        if not mlp_parts <= _MLP_PARTS or not {"gate_proj", "up_proj", "down_proj"} <= mlp_parts:
            return f"layer {i} MLP has sub-modules {sorted(mlp_parts)}"
        if not (is_rms_norm(layer.input_layernorm) and is_rms_norm(layer.post_attention_layernorm)):
            return f"layer {i} norms are not RMSNorms with variance_epsilon"
    return None


def run_layers(layers, final_norm, h: torch.Tensor, position_embeddings, kv, groups, layer_group, backend: str,
               attend=None, first: int = 0, projections=None, linear=None):
    """The decode step from the embeddings ``h [B, S, D]`` (S = 1) to the final norm's output ``[B, S, D]``.

    ``kv`` is the step's :class:`~vtoken.engine.static_kv.StaticKV` (the new key/value are written at
    the group's slot, by :func:`~vtoken.kernels.decode_ops.rope_qk_store` with the rotation; another
    cache object, the prefill tail's writer, gets ``update`` calls); ``groups[layer_group[i]]`` holds layer
    i's kept-index list and count. ``attend(i, q, k_buf, v_buf, scale, backend)``, if given, replaces
    the layer's ``gather_attend`` call (decode-time stages, :mod:`vtoken.engine.static_stages`; the
    prefill tail, :func:`run_prefill_layers`). ``layers[j]`` is the model's layer ``first + j``.
    ``projections``, if given, is a :class:`~vtoken.engine.merged_projections.MergedProjections` over
    the model's layers: q/k/v in one GEMM, gate/up in one. ``linear(x, weight, bias)`` computes the
    plain ``nn.Linear`` projections' GEMMs (default ``F.linear``; with ``gemv=True`` the decode step
    passes :func:`vtoken.kernels.gemv.skinny_linear`, a Triton GEMV at batch 1 on CUDA)."""
    linear = linear or F.linear
    cos, sin = position_embeddings
    if cos.dim() == 4:  # M-RoPE [3, B, 1, Dh]: equal components for a decode token
        cos, sin = cos[0], sin[0]
    B, S = h.shape[0], h.shape[1]
    # a table shared by every row ([1, S, Dh]) is expanded to one per row
    cos, sin = cos.expand(B, -1, -1).contiguous(), sin.expand(B, -1, -1).contiguous()
    x, residual = h, None
    for j, layer in enumerate(layers):
        i = first + j
        attn, mlp = layer.self_attn, layer.mlp
        normed, residual = add_rms_norm(x, residual, layer.input_layernorm.weight,
                                        layer.input_layernorm.variance_epsilon, backend=backend)
        Dh = int(attn.head_dim)
        if projections is None:
            q, k, v = (run_linear(p, normed, linear) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        else:
            q, k, v = projections.qkv(i, normed, linear)
        if S == 1 and isinstance(kv, StaticKV):  # a decode step: rotate and write the cache in one launch
            k_buf, v_buf = kv.keys[i], kv.values[i]
            q = rope_qk_store(q, k, v, cos, sin, k_buf, v_buf, kv.groups[kv.layer_group[i]].slot, backend=backend)
        else:  # the prefill tail: its writer stores S rows per layer
            q, k, v = (t.view(B, S, -1, Dh).transpose(1, 2).contiguous() for t in (q, k, v))
            q, k = rope_qk(q, k, cos, sin, backend=backend)
            k_buf, v_buf = kv.update(k, v, i)
        if attend is not None:
            out = attend(i, q, k_buf, v_buf, attn.scaling, backend)
        else:
            group = groups[layer_group[i]]
            out = gather_attend(q, k_buf, v_buf, group.idx, group.count, scale=attn.scaling, backend=backend)
        x = run_linear(attn.o_proj, out.transpose(1, 2).reshape(B, S, -1), linear)
        normed, residual = add_rms_norm(x, residual, layer.post_attention_layernorm.weight,
                                        layer.post_attention_layernorm.variance_epsilon, backend=backend)
        if projections is None:
            gate, up = run_linear(mlp.gate_proj, normed, linear), run_linear(mlp.up_proj, normed, linear)
        else:
            gate, up = projections.gate_up(i, normed, linear)
        x = run_linear(mlp.down_proj, silu_mul(gate, up, backend=backend), linear)
    return add_rms_norm(x, residual, final_norm.weight, final_norm.variance_epsilon, backend=backend)[0]


def decode_linear(backend: str, gemv: bool):
    """The decode step's ``linear(x, weight, bias)``: :func:`vtoken.kernels.gemv.skinny_linear` (a
    Triton GEMV for one row on CUDA, ``F.linear`` otherwise) with ``gemv``, else ``F.linear``."""
    return functools.partial(skinny_linear, backend=backend) if gemv else F.linear


def run_prefill_layers(layers, final_norm, h: torch.Tensor, mask, position_embeddings, writer, backend: str,
                       first: int, projections=None) -> torch.Tensor:
    """The captured prefill tail with the fused element-wise ops: the model's layers ``first..``
    on ``h [B, S, D]`` (each layer's keys / values written by ``writer.update``) with the model's
    own attention function (``config._attn_implementation``) over them and ``mask`` (the 4-D mask
    the layers would get, or None), then the final norm: ``[B, S, D]``. Rotary tables must be
    ``[B, S, Dh]`` (:func:`prefill_tail_supported`)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def attend(i, q, k_buf, v_buf, scale, backend):
        attn = layers[i - first].self_attn
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        out, _ = fn(attn, q, k_buf, v_buf, mask, dropout=0.0, scaling=scale)
        return out.transpose(1, 2)  # [B, S, H, Dh] -> [B, H, S, Dh], as gather_attend returns

    return run_layers(layers, final_norm, h, position_embeddings, writer, None, None, backend, attend=attend,
                      first=first, projections=projections)


def prefill_tail_supported(position_embeddings) -> bool:
    """Whether :func:`run_prefill_layers` computes the tail exactly: one rotary table per token
    (``[B, S, Dh]``; M-RoPE's per-component tables ``[3, B, S, Dh]`` differ in a prefill)."""
    return position_embeddings[0].dim() == 3
