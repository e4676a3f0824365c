"""Route a Qwen-VL vision tower's windowed attention through :func:`varlen_attention` (one launch a layer).

On ``transformers``' SDPA (and eager) path, ``Qwen2_5_VLVisionAttention`` splits q/k/v with
``torch.split(lengths.tolist())`` and calls attention once per window or frame: about a thousand
small launches per layer at 16K patches, plus a device-to-host sync per layer. The flash-attention
path avoids that but needs the ``flash-attn`` package. :func:`patch_vision_varlen` swaps the
``forward`` of each vision attention module (an instance attribute; the class is untouched) for one
that runs the same projections and rotary embedding, then one :func:`varlen_attention` call over
``cu_seqlens``. Where the kernels run (Triton), the rotary embedding is one launch too
(:func:`vtoken.kernels.vision_rope.rope_vision`), once it has been checked against the module's own
``apply_rotary_pos_emb_vision`` on the first call's inputs for that device and dtype (agreeing to
one rounding step of the output dtype); where it does not agree, the module's own function runs.

Supported modules: those of Qwen2-VL (``VisionAttention``), Qwen2.5-VL (``Qwen2_5_VLVisionAttention``)
and other towers with the same layout: a fused ``qkv`` linear, ``proj``, ``num_heads``, ``scaling``,
and ``apply_rotary_pos_emb_vision`` in their modeling module.
"""

from __future__ import annotations

import sys
import types
import weakref
from typing import Callable, Optional

import torch
from torch import nn

from vtoken.kernels.dispatch import resolve_backend
from vtoken.kernels.varlen import varlen_attention
from vtoken.kernels.vision_rope import rope_vision


def _is_windowed_vision_attention(module: nn.Module) -> bool:
    if not all(hasattr(module, a) for a in ("qkv", "proj", "num_heads")):
        return False
    if not isinstance(getattr(module, "qkv"), nn.Linear):
        return False
    mod = sys.modules.get(type(module).__module__)
    return mod is not None and hasattr(mod, "apply_rotary_pos_emb_vision") and "VisionAttention" in type(module).__name__


def _version(t: torch.Tensor):
    """``t``'s version counter; None for an inference tensor (made under ``torch.inference_mode()``),
    which keeps none (reading it raises): such a tensor is identified by the object alone."""
    return None if t.is_inference() else t._version


class _MaxSeqlenCache:
    """Longest segment of each ``cu_seqlens`` tensor seen, so a tower forward reads it once, not per layer."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, Optional[int], int]] = {}

    def get(self, cu_seqlens: torch.Tensor) -> int:
        key = id(cu_seqlens)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is cu_seqlens and hit[1] == _version(cu_seqlens):
            return hit[2]
        value = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if cu_seqlens.numel() > 1 else 0
        self._entries = {k: e for k, e in self._entries.items() if e[0]() is not None}
        self._entries[key] = (weakref.ref(cu_seqlens), _version(cu_seqlens), value)
        return value


class _RopeCheck:
    """Whether :func:`rope_vision` computes what a tower's ``apply_rotary_pos_emb_vision`` computes,
    decided once per (function, device, dtype) on the first call's own inputs (a few tokens): every
    element within one rounding step of the output dtype. ``verdicts`` holds the decisions."""

    def __init__(self):
        self.verdicts: dict = {}

    def agrees(self, rope, q, k, cos, sin, backend: str) -> bool:
        key = (rope, q.device, q.dtype)
        if key not in self.verdicts:
            n = min(8, q.shape[0])
            want = rope(q[:n], k[:n], cos[:n], sin[:n])
            got = rope_vision(q[:n], k[:n], cos[:n], sin[:n], backend=backend)
            eps = torch.finfo(q.dtype).eps
            self.verdicts[key] = all(
                bool(((g.float() - w.float()).abs() <= eps * w.float().abs() + torch.finfo(q.dtype).tiny).all())
                for g, w in zip(got, want))
        return self.verdicts[key]


def _make_forward(module: nn.Module, backend: str, cache: _MaxSeqlenCache, triton_only: bool = False,
                  rope_check: Optional[_RopeCheck] = None):
    rope = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
    own = module.forward  # the module's forward before the patch

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        rotary_pos_emb: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if triton_only and resolve_backend(backend, hidden_states) != "triton":  # CPU, or gradients needed
            extra = {} if rotary_pos_emb is None else {"rotary_pos_emb": rotary_pos_emb}
            if max_seqlen is not None:
                extra["max_seqlen"] = max_seqlen
            return own(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **extra, **kwargs)
        seq_length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        if position_embeddings is None:  # older transformers passed the raw rotary angles
            emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
            position_embeddings = (emb.cos(), emb.sin())
        cos, sin = position_embeddings
        fused = (rope_check is not None and resolve_backend(backend, q, k, cos, sin) == "triton"
                 and rope_check.agrees(rope, q, k, cos, sin, backend))
        q, k = rope_vision(q, k, cos, sin, backend=backend) if fused else rope(q, k, cos, sin)  # [Total, H, D]
        if not isinstance(max_seqlen, int):
            max_seqlen = cache.get(cu_seqlens)
        scale = getattr(self, "scaling", None)
        out = varlen_attention(q, k, v, cu_seqlens, scale=scale, max_seqlen=max_seqlen, backend=backend)
        return self.proj(out.reshape(seq_length, -1))

    return types.MethodType(forward, module)


def patch_vision_varlen(vision_model: nn.Module, *, backend: str = "auto", triton_only: bool = False,
                        skip: tuple = (), fused_rope: bool = True) -> Callable[[], None]:
    """Make every windowed vision-attention module under ``vision_model`` use :func:`varlen_attention`.

    Args:
        vision_model: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower (e.g. ``model.visual`` or
            ``model.model.visual``), or any module containing one.
        backend: passed to :func:`varlen_attention` (``"auto"``: Triton on CUDA, per-segment SDPA
            elsewhere).
        triton_only: where the backend resolves to PyTorch (CPU tensors, or gradients needed), run
            each module's own forward instead (what ``apply_pruning`` installs: the tower is then
            exactly transformers' wherever the kernel would not run).
        skip: modules to leave as they are (e.g. one whose attention a probe reads).
        fused_rope: where the kernels run, the rotary embedding as one launch (checked first, see
            the module docstring); False keeps the module's own ``apply_rotary_pos_emb_vision``.

    Returns:
        ``remove()``: restores the original ``forward`` of every patched module. The output of the
        patched tower equals the unpatched one up to floating-point rounding.

    Raises:
        ValueError: when no supported attention module is found, or the tower is already patched.
    """
    targets = [m for m in vision_model.modules() if _is_windowed_vision_attention(m) and not any(m is x for x in skip)]
    if not targets:
        raise ValueError(
            f"no windowed vision attention module (qkv/proj/num_heads + apply_rotary_pos_emb_vision) "
            f"found under {type(vision_model).__name__}"
        )
    if any("forward" in m.__dict__ and getattr(m.forward, "_vtoken_varlen", False) for m in targets):
        raise ValueError(f"{type(vision_model).__name__} is already patched by patch_vision_varlen")
    cache = _MaxSeqlenCache()
    check = _RopeCheck() if fused_rope else None
    saved = []
    for m in targets:
        saved.append((m, m.__dict__.get("forward")))
        fwd = _make_forward(m, backend, cache, triton_only, check)
        fwd.__func__._vtoken_varlen = True
        m.forward = fwd

    def remove() -> None:  # (``remove.rope_verdicts``: the fused-rope checks made so far)
        for m, old in saved:
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old
        saved.clear()

    remove.rope_verdicts = {} if check is None else check.verdicts
    return remove
