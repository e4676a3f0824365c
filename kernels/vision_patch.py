"""Route a Qwen-VL vision tower's windowed attention through :func:`varlen_attention` (one launch a layer).

On ``transformers``' SDPA (and eager) path, ``Qwen2_5_VLVisionAttention`` splits q/k/v with
``torch.split(lengths.tolist())`` and calls attention once per window or frame: about a thousand
small launches per layer at 16K patches, plus a device-to-host sync per layer. The flash-attention
path avoids that but needs the ``flash-attn`` package. :func:`patch_vision_varlen` swaps the
``forward`` of each vision attention module (an instance attribute; the class is untouched) for one
that runs the same projections and rotary embedding, then one :func:`varlen_attention` call over
``cu_seqlens`` (or, where every segment is at least ``LONG_SEGMENT`` patches long, as in the
full-attention blocks of a large image, one cuDNN fused-attention call per segment:
:func:`vtoken.kernels.varlen.long_segment_attention`). Where the kernels run (Triton), the rotary
embedding is one launch too
(:func:`vtoken.kernels.vision_rope.rope_vision`), once it has been checked against the module's own
``apply_rotary_pos_emb_vision`` on the first call's inputs for that device and dtype (agreeing to
one rounding step of the output dtype); where it does not agree, the module's own function runs.
Qwen2.5-VL's RMSNorm blocks also run fused there (:func:`_make_block_forward`): each residual add
with the next norm in one kernel, and the gated MLP as one gate/up GEMM and one down GEMM whose
3,420-wide dimension is zero-padded to a multiple of 8 (16-byte rows: Hopper's fast GEMM kernels,
:mod:`vtoken.kernels.merged_linear`), checked the same way.

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

from vtoken.kernels.checks import Verdicts
from vtoken.kernels.decode_ops import add_rms_norm, is_rms_norm, silu_mul
from vtoken.kernels.dispatch import resolve_backend
from vtoken.kernels.merged_linear import MergedLinear, mergeable
from vtoken.kernels.varlen import LONG_SEGMENT, is_capturing, long_segment_attention, varlen_attention
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


class _SegmentCache:
    """The host copy of each ``cu_seqlens`` tensor seen (its segment boundaries), so a tower forward
    reads it once, not per layer."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, Optional[int], tuple]] = {}

    def bounds(self, cu_seqlens: torch.Tensor) -> tuple:
        key = id(cu_seqlens)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is cu_seqlens and hit[1] == _version(cu_seqlens):
            return hit[2]
        value = tuple(int(b) for b in cu_seqlens.tolist())
        self._entries = {k: e for k, e in self._entries.items() if e[0]() is not None}
        self._entries[key] = (weakref.ref(cu_seqlens), _version(cu_seqlens), value)
        return value


def _step(dtype: torch.dtype) -> float:
    """One rounding step of ``dtype``, relative; for float32 a few steps (a fused reduction sums in
    another order than PyTorch's), still far below any difference of formula."""
    return max(torch.finfo(dtype).eps, 2.0 ** -18)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Every element within a rounding step of its own size plus one of its row's largest (a sum
    over a row, as a GEMM's, carries the rounding of its largest terms into small results)."""
    w = want.float().abs()
    scale = w + w.amax(dim=-1, keepdim=True)
    return bool(((got.float() - want.float()).abs() <= _step(want.dtype) * scale + 1e-30).all())


class _FusedChecks:
    """Whether a fused kernel computes what the tower's own code computes, decided once per key
    (what is replaced, device, dtype) on the first call's own inputs (a few tokens): every element
    within a rounding step of the output dtype (:func:`_close`). ``verdicts`` holds the decisions."""

    def __init__(self):
        self.verdicts = Verdicts()

    def agrees(self, key: tuple, want: Callable, got: Callable) -> bool:
        """``want()`` / ``got()``: the tower's and the kernel's outputs (a tensor or a tuple of them)."""
        def judge() -> bool:
            w, g = want(), got()
            w, g = (w,) if torch.is_tensor(w) else w, (g,) if torch.is_tensor(g) else g
            return all(g_.shape == w_.shape and _close(g_, w_) for g_, w_ in zip(g, w))
        return self.verdicts.decide(key, judge)


def _is_rms_norm_block(block: nn.Module) -> bool:
    """A vision block computing ``h + attn(norm1(h))``, then ``h + mlp(norm2(h))`` with RMSNorms
    (``variance_epsilon``) and a gated MLP (Qwen2.5-VL's ``Qwen2_5_VLVisionBlock``; Qwen2-VL's and
    Qwen3-VL's blocks use LayerNorm and keep their own forward)."""
    mlp = getattr(block, "mlp", None)
    return (type(block).__name__ == "Qwen2_5_VLVisionBlock"
            and all(is_rms_norm(getattr(block, n, None)) for n in ("norm1", "norm2"))
            and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn")))


class _PaddedMLP:
    """A gated MLP's gate/up as one GEMM and its down projection, their width padded to a multiple
    of 8 (:class:`~vtoken.kernels.merged_linear.MergedLinear`: Qwen2.5-VL's 3,420 is not 16-byte
    aligned in bf16, which keeps cuBLAS off Hopper's fast kernels), made at the first fused call
    (the model's weights become views of the padded buffers only where the kernels run) and
    released by ``remove()``: ``self(x)`` = ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, mlp: nn.Module, backend: str, made: list):
        self.mlp, self.backend, self.made = mlp, backend, made
        self.gate_up = self.down = None
        self.tried = False

    def ready(self) -> bool:
        if not self.tried:
            self.tried = True
            parts, down = [self.mlp.gate_proj, self.mlp.up_proj], [self.mlp.down_proj]
            if mergeable(down):
                self.gate_up = MergedLinear.of(parts, pad_out=8)
                self.down = MergedLinear(down, pad_in=8) if self.gate_up is not None else None
                self.made += [m for m in (self.gate_up, self.down) if m is not None]
        return self.gate_up is not None and self.gate_up.intact() and self.down.intact()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)  # [..., F'] each (zero beyond F)
        return self.down(silu_mul(gate, up, backend=self.backend))[0]


def _make_block_forward(block: nn.Module, backend: str, checks: _FusedChecks, made: list):
    """The block's forward with :func:`~vtoken.kernels.decode_ops.add_rms_norm` (the residual add and
    the next norm in one kernel) and the SiLU-gated MLP as :class:`_PaddedMLP` (one aligned GEMM for
    gate/up, :func:`~vtoken.kernels.decode_ops.silu_mul`, an aligned down GEMM): the same arithmetic,
    each part checked against the block's own module on the first call's rows (``made`` collects the
    merged buffers for ``remove()``)."""
    own = block.forward
    norm1, norm2, mlp = block.norm1, block.norm2, block.mlp
    silu = isinstance(mlp.act_fn, nn.SiLU) or type(mlp.act_fn).__name__ == "SiLUActivation"
    padded = _PaddedMLP(mlp, backend, made) if silu else None

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, **kwargs) -> torch.Tensor:
        x = hidden_states
        if resolve_backend(backend, x) != "triton" or not x.is_contiguous():
            return own(hidden_states, cu_seqlens, **kwargs)
        rows, dev, dt = x[: min(8, x.shape[0])], x.device, x.dtype
        if not checks.agrees((type(norm1), dev, dt), lambda: norm1(rows), lambda: add_rms_norm(
                rows, None, norm1.weight, norm1.variance_epsilon, backend=backend)[0]):
            return own(hidden_states, cu_seqlens, **kwargs)
        normed, _ = add_rms_norm(x, None, norm1.weight, norm1.variance_epsilon, backend=backend)
        attn = self.attn(normed, cu_seqlens=cu_seqlens, **kwargs)
        normed, h = add_rms_norm(attn, x, norm2.weight, norm2.variance_epsilon, backend=backend)  # h = x + attn
        if padded is not None and padded.ready() and checks.agrees(
                (type(mlp), dev, dt), lambda: mlp(normed[:8]), lambda: padded(normed[:8])):
            return h + padded(normed)
        return h + mlp(normed)

    return types.MethodType(forward, block)


def _make_forward(module: nn.Module, backend: str, cache: _SegmentCache, triton_only: bool = False,
                  checks: Optional[_FusedChecks] = None, long_segments_cudnn: bool = True):
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
        n = min(8, seq_length)
        fused = (checks is not None and resolve_backend(backend, q, k, cos, sin) == "triton" and checks.agrees(
            (rope, q.device, q.dtype), lambda: rope(q[:n], k[:n], cos[:n], sin[:n]),
            lambda: rope_vision(q[:n], k[:n], cos[:n], sin[:n], backend=backend)))
        q, k = rope_vision(q, k, cos, sin, backend=backend) if fused else rope(q, k, cos, sin)  # [Total, H, D]
        scale, out = getattr(self, "scaling", None), None
        long_ok = long_segments_cudnn and not is_capturing(q)  # (the boundaries are read on the host)
        if not isinstance(max_seqlen, int) or (long_ok and max_seqlen >= LONG_SEGMENT):
            bounds = cache.bounds(cu_seqlens)
            lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])] or [0]
            max_seqlen = max(lengths)
            if long_ok and min(lengths) >= LONG_SEGMENT and resolve_backend(backend, q, k, v) == "triton":
                out = long_segment_attention(q, k, v, bounds, scale)  # (None where cuDNN's does not run)
        if out is None:
            out = varlen_attention(q, k, v, cu_seqlens, scale=scale, max_seqlen=max_seqlen, backend=backend)
        return self.proj(out.reshape(seq_length, -1))

    return types.MethodType(forward, module)


def patch_vision_varlen(vision_model: nn.Module, *, backend: str = "auto", triton_only: bool = False,
                        skip: tuple = (), fused_ops: bool = True, long_segments_cudnn: bool = True) -> Callable[[], None]:
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
        fused_ops: where the kernels run, the rotary embedding as one launch, and in RMSNorm
            blocks (Qwen2.5-VL) the norms with the residual adds fused and the gated MLP as two
            GEMMs of 8-aligned width around a fused gate (:func:`_make_block_forward`; the MLP's
            weights become views of padded buffers until ``remove()``), each checked first (see
            the module docstring); False keeps the tower's own code around the attention.
        long_segments_cudnn: where the kernels run, a layer whose segments are all at least
            ``LONG_SEGMENT`` patches (full attention over a large image) uses cuDNN's fused
            attention per segment (:func:`vtoken.kernels.varlen.long_segment_attention`); False
            keeps :func:`varlen_attention` for every layer.

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
    cache = _SegmentCache()
    checks = _FusedChecks() if fused_ops else None
    saved = []
    for m in targets:
        saved.append((m, m.__dict__.get("forward")))
        fwd = _make_forward(m, backend, cache, triton_only, checks, long_segments_cudnn)
        fwd.__func__._vtoken_varlen = True
        m.forward = fwd
    blocks = [b for b in vision_model.modules() if _is_rms_norm_block(b) and any(b.attn is m for m in targets)]
    made: list = []  # MergedLinear buffers the fused blocks make (their weights' views): released by remove()
    for b in blocks if fused_ops else ():
        saved.append((b, b.__dict__.get("forward")))
        b.forward = _make_block_forward(b, backend, checks, made)

    def remove() -> None:  # (``remove.fused_verdicts``: the fused kernels' checks made so far)
        for m, old in saved:
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old
        saved.clear()
        for merged in made:
            merged.release()
        made.clear()

    remove.fused_verdicts = {} if checks is None else checks.verdicts
    return remove
