"""Attention probes: read the attention rows a scorer needs from a layer's own queries and keys.

The probed layer keeps its fast attention (SDPA / flash / the Triton kernel): vtoken swaps the
attention *implementation name* of that one attention module (a private copy of its config) to
``"vtoken"``, whose function calls the original implementation and, during a pruning prefill,
also computes softmax probabilities for the few query rows the scorer needs (last prompt
token, text rows) over all keys. Nothing N x N is materialised; the cost is O(R * N) for R rows.
"""

from __future__ import annotations

import copy
import sys

import torch

from vtoken.signals import attention_probs

try:  # transformers >= 5
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
except ImportError:  # pragma: no cover
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PROBE_IMPL = "vtoken"


def eager_attention_of(module) -> callable:
    """The eager attention function ``module``'s own forward falls back to: the
    ``eager_attention_forward`` of the modelling file that defines its class. The families'
    functions differ (Llama's repeats grouped KV heads through ``module.num_key_value_groups``,
    which CLIP's and SigLIP's attention modules do not have), so one family's cannot stand in for
    another's. Llama's is the fallback for a class defined outside a modelling file."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if not callable(fn):
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def base_attention(module) -> callable:
    """The attention function a probed ``module`` would use without vtoken, resolved at call time
    from the model's SHARED config, so ``model.set_attn_implementation(...)`` after
    ``apply_pruning`` also switches the probed layers (the probe only reads rows on the side)."""
    name = module.__dict__["_vtoken_shared_config"]._attn_implementation
    eager = module.__dict__["_vtoken_eager_attention"]
    if name in (None, "eager"):
        return eager
    get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    return get_interface(name, eager) if get_interface is not None else ALL_ATTENTION_FUNCTIONS[name]


def _vtoken_attention(module, query, key, value, attention_mask, **kwargs):
    base = base_attention(module)
    probe = module.__dict__.get("_vtoken_probe")
    runtime = module.__dict__.get("_vtoken_runtime")
    # no prefill in flight (a decode step, maybe compiled): the layer's own attention, nothing eager
    if probe is None or (runtime is not None and runtime.prefills_in_flight == 0):
        return base(module, query, key, value, attention_mask, **kwargs)
    return probe(base, module, query, key, value, attention_mask, **kwargs)


def register_attention_implementation(name: str, fn) -> None:
    """Make ``fn(module, query, key, value, attention_mask, **kw)`` available to attention modules
    under the implementation name ``name`` (transformers' ``AttentionInterface``), once."""
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, fn)


def register_probe_implementation() -> None:
    register_attention_implementation(PROBE_IMPL, _vtoken_attention)


def private_attention_config(config, implementation: str, **attrs):
    """A shallow copy of an attention module's ``config`` whose attention implementation is
    ``implementation`` (a name in transformers' ``ALL_ATTENTION_FUNCTIONS``), plus ``attrs``:
    only the module given the copy changes; the model's shared config stays as it was."""
    private = copy.copy(config)
    private._attn_implementation_internal = implementation
    for name, value in attrs.items():
        setattr(private, name, value)
    return private


def install_probe(attn_module, probe, runtime=None) -> callable:
    """Route ``attn_module`` through ``probe(base, module, q, k, v, mask, **kw)``; returns undo.
    ``runtime`` (an LLM layer's probe): the probe is skipped while its ``prefills_in_flight`` is 0."""
    register_probe_implementation()
    original_config = attn_module.config
    name = original_config._attn_implementation
    if name not in (None, "eager"):
        ALL_ATTENTION_FUNCTIONS[name]  # an unknown implementation name fails here, before any change
    attn_module.config = private_attention_config(original_config, PROBE_IMPL)
    attn_module._vtoken_shared_config = original_config  # the implementation is read from it per call
    attn_module._vtoken_eager_attention = eager_attention_of(attn_module)
    attn_module._vtoken_probe = probe
    if runtime is not None:
        attn_module._vtoken_runtime = runtime

    def undo():
        attn_module.config = original_config
        for name in ("_vtoken_shared_config", "_vtoken_eager_attention", "_vtoken_probe", "_vtoken_runtime"):
            attn_module.__dict__.pop(name, None)

    return undo


def attention_rows(
    query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, key_valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Exact softmax probabilities of selected query rows over all keys (PyTorch reference).

    query (B, H, N, D), key (B, Hkv, N, D) post-RoPE; rows (B, R) long query indices (-1 =
    unused); key_valid (B, N) bool. Causal: row i sees keys j <= i that are valid (and itself).
    -> (B, H, R, N) float32; unused rows are all zero.
    """
    B, H, N, D = query.shape
    r = rows.clamp(min=0)
    q = query.gather(2, r.view(B, 1, -1, 1).expand(B, H, r.shape[1], D))
    j = torch.arange(N, device=query.device).view(1, 1, N)
    allowed = (j <= r.unsqueeze(-1)) & (key_valid.unsqueeze(1) | (j == r.unsqueeze(-1)))  # (B, R, N)
    return attention_probs(q, key, allowed, scaling).masked_fill((rows < 0).view(B, 1, -1, 1), 0.0)


def step_rows(query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """Head-summed softmax rows of a decode call's q queries (the last q of the layer's L slots)
    over its keys. query (B, H, q, D), key (B, Hkv, L, D) post-RoPE, key_valid (B, L) ->
    (B, q, L) float32 (rows of padding queries zero)."""
    B, _, q, _ = query.shape
    L = key.shape[2]
    j = torch.arange(L, device=query.device).view(1, L)
    own = (L - q + torch.arange(q, device=query.device)).view(q, 1)
    allowed = ((j <= own).unsqueeze(0) & key_valid.view(B, 1, L)) | (j == own).unsqueeze(0)  # (B, q, L)
    return attention_probs(query, key, allowed, scaling).sum(dim=1) * key_valid[:, L - q:].unsqueeze(-1)


def chain_probe(module, probe) -> callable:
    """Route an attention module the prefill runtime already probes through ``probe`` as well:
    ``probe``'s ``base`` is the prefill runtime's probe (skipped, as it skips itself, while no
    prefill is in flight). Returns undo."""
    prev = module.__dict__["_vtoken_probe"]
    prev_rt = module.__dict__.pop("_vtoken_runtime", None)

    def inner(base):
        def run(mod, query, key, value, attention_mask, **kw):
            if prev_rt is not None and prev_rt.prefills_in_flight == 0:
                return base(mod, query, key, value, attention_mask, **kw)
            return prev(base, mod, query, key, value, attention_mask, **kw)
        return run

    module._vtoken_probe = lambda base, mod, *a, **kw: probe(inner(base), mod, *a, **kw)

    def undo():
        module._vtoken_probe = prev
        if prev_rt is not None:
            module._vtoken_runtime = prev_rt

    return undo
