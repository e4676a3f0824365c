"""Linears that read one input as one GEMM, over a buffer the model's own parameters become views of.

Two reasons to run projections from a buffer of vtoken's own layout rather than the model's:

- **fewer, larger GEMMs**: q/k/v, or gate/up, read the same input; one GEMM over their stacked
  weights ``[N_q + N_k + N_v, K]`` reads the weights nearer the memory bandwidth than three
  (serving engines stack them at load time: vLLM's ``QKVParallelLinear``).
- **aligned leading dimensions**: Hopper's fast GEMM kernels load tiles with the tensor memory
  accelerator, which needs every row of an operand to start on a 16-byte boundary. Qwen2.5-VL's
  vision MLP is 3,420 wide (6,840 bytes a bf16 row), so cuBLAS falls back to sm80 kernels for its
  gate, up and down GEMMs: about 250 TFLOP/s against about 760 for the tower's aligned q/k/v GEMM
  (benchmarks/e2e/qwen_one_image_h100_s7/qwen_tower_profile.txt). Padding the width to a multiple
  of 8 with zero rows / columns computes the same sums (the extra products are exact zeros) on the
  fast kernels.

:class:`MergedLinear` copies the weights (and biases) into one zero-padded buffer ``[sum N_i', K']``
(``N_i'`` each part's rows padded to ``pad_out``, ``K'`` the input width padded to ``pad_in``) and
re-points each ``nn.Linear``'s ``weight`` / ``bias`` at its slice (``param.data = view``: the same
``Parameter`` objects and values, the old storage freed, so no extra memory; with ``pad_in`` the
view skips the zero columns and is not contiguous, which ``F.linear``, ``state_dict`` and
``save_pretrained`` handle). :meth:`release` gives each parameter its own storage back.

Only plain, contiguous, floating ``nn.Parameter`` s that own their whole storage, on one device and
dtype, with biases on all or none of the parts, and no accelerate offload hook, are merged
(:func:`mergeable`); quantized, tied, shared or offloaded weights keep their own layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module  # (the global forward hooks)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def mergeable(linears: list) -> bool:
    """Whether :class:`MergedLinear` may re-point these linears' parameters (see the module docstring)."""
    ws = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears]
    if any(hasattr(lin, "_hf_hook") for lin in linears) or any(type(w) is not nn.Parameter for w in ws):
        return False
    if len({(w.device, w.dtype, w.shape[1]) for w in ws}) != 1 or not ws[0].is_floating_point() or ws[0].is_meta:
        return False
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return False
    for t in ws + [b for b in biases if b is not None]:
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not (t.is_contiguous() and t.storage_offset() == 0 and whole):
            return False  # tied, shared or already a view: re-pointing would change what else reads it
    return True


def run_linear(module, x: torch.Tensor, linear=F.linear) -> torch.Tensor:
    """``module(x)``, with the GEMM done by ``linear(x, weight, bias)`` where ``module`` is a plain
    ``nn.Linear`` and no forward hook (its own or a global one) would fire; a subclass, a quantized,
    hooked or accelerate-wrapped module runs its own forward."""
    plain = type(module) is nn.Linear and "forward" not in module.__dict__  # (accelerate swaps forward)
    hooked = (module._forward_hooks or module._forward_pre_hooks or _module._global_forward_hooks
              or _module._global_forward_pre_hooks)
    if plain and not hooked:
        return linear(x, module.weight, module.bias)
    return module(x)


class MergedLinear:
    """``linears`` (reading one input ``x [..., K]``) as one GEMM: ``self(x)`` -> one output per
    linear, ``[..., N_i']`` (``N_i`` rounded up to ``pad_out``; the padded columns are zero). With
    ``pad_in > 1``, ``x`` must be ``[..., K']`` (``K`` rounded up to ``pad_in``; its extra columns
    meet zero weights). ``weight [sum N_i', K']``, ``bias [sum N_i']`` or None."""

    @classmethod
    def of(cls, linears: list, pad_out: int = 1, pad_in: int = 1) -> "MergedLinear | None":
        """The merge of ``linears``, or None where their parameters cannot be re-pointed (:func:`mergeable`)."""
        return cls(linears, pad_out, pad_in) if mergeable(linears) else None

    def __init__(self, linears: list, pad_out: int = 1, pad_in: int = 1):
        """(Use :meth:`of`, which checks :func:`mergeable` first.)"""
        self.linears = list(linears)
        first = linears[0].weight
        self.sizes = [lin.weight.shape[0] for lin in linears]
        self.padded = [_round_up(n, pad_out) for n in self.sizes]
        k = first.shape[1]
        self.in_features = _round_up(k, pad_in)
        self.weight = first.new_zeros(sum(self.padded), self.in_features)
        self.bias = None if linears[0].bias is None else first.new_zeros(sum(self.padded))
        self._slices = []
        start = 0
        for lin, n, n_pad in zip(self.linears, self.sizes, self.padded):
            w = self.weight[start:start + n, :k]
            w.copy_(lin.weight.detach())
            lin.weight.data = w
            b = None
            if self.bias is not None:
                b = self.bias[start:start + n]
                b.copy_(lin.bias.detach())
                lin.bias.data = b
            self._slices.append((w, b))
            start += n_pad
        # (the modules' parameter dicts, read without nn.Module.__getattr__'s cost)
        self._expected = [(lin._parameters, (w.data_ptr(), w.shape, None if b is None else b.data_ptr()))
                          for lin, (w, b) in zip(self.linears, self._slices)]

    def intact(self) -> bool:
        """Whether every parameter still is the view it was given (none re-assigned or moved).
        Cheap (run before each engine call): the parameters' data pointers and shapes only."""
        for params, (w_ptr, w_shape, b_ptr) in self._expected:
            w, b = params.get("weight"), params.get("bias")
            if w is None or w.data_ptr() != w_ptr or w.shape != w_shape:
                return False
            if b_ptr is not None and (b is None or b.data_ptr() != b_ptr):
                return False
        return True

    def __call__(self, x: torch.Tensor, linear=F.linear) -> tuple:
        """One output per linear; ``linear(x, weight, bias)`` computes the GEMM (``F.linear``, or a
        kernel of the same contract such as :func:`vtoken.kernels.gemv.skinny_linear`)."""
        return linear(x, self.weight, self.bias).split(self.padded, dim=-1)

    def release(self) -> None:
        """Every parameter still reading the buffers gets its own (contiguous) storage back."""

        def inside(t, buf) -> bool:
            start = buf.data_ptr()
            return (t is not None and t.device == buf.device
                    and start <= t.data_ptr() < start + buf.numel() * buf.element_size())

        for lin in self.linears:
            if inside(lin.weight, self.weight):
                lin.weight.data = lin.weight.data.clone(memory_format=torch.contiguous_format)
            if self.bias is not None and inside(lin.bias, self.bias):
                lin.bias.data = lin.bias.data.clone(memory_format=torch.contiguous_format)
