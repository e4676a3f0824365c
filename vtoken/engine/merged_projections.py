"""One GEMM for q/k/v and one for gate/up in the fused decode layers, without extra weight memory.

A decode step at batch 1-32 is bound by reading the weights, and a small GEMM reads them further
from the bandwidth than a large one: on an H100, LLaVA-1.5-7B's seven projections per layer ran
at about 2.3-2.45 TB/s of the 3.35 (benchmarks/e2e/profile_ttft_h100_s15). Serving engines merge
the projections that read the same input at load time (vLLM's ``QKVParallelLinear`` and
``MergedColumnParallelLinear``). vtoken cannot load the model, so :class:`MergedProjections`
merges in place (:class:`vtoken.kernels.merged_linear.MergedLinear`): each layer's ``q/k/v_proj``
weights ``[Nq | Nk | Nv, D]`` (and biases) are copied into one buffer ``[Nq + Nk + Nv, D]`` and the
model's own ``Parameter`` s are re-pointed at its row slices (``param.data = buffer[a:b]``: the same
objects, the same values, the old storage freed, so no extra memory); ``gate/up_proj`` likewise
``[2F, D]``. The model's own forward reads the views and computes what it computed; ``load_state_dict`` writes through them into the buffer.
:meth:`restore` gives every parameter its own storage again (``handle.remove()`` /
:meth:`vtoken.engine.StaticDecoder.close`).

A group :func:`~vtoken.kernels.merged_linear.mergeable` refuses (quantized, tied, shared or
offloaded weights) keeps its separate projections, and is not looked at again while its weights
stay the same. A merged group whose parameters were re-assigned since (``proj.weight = ...``) is
detected before each use and merged again.

Numerics: each output element is the same dot product; cuBLAS may pick a different kernel (tile,
split-K) for the larger GEMM, so on a GPU an element may differ by one bfloat16 rounding step, as
``fused_ops``' element-wise kernels may (on the CPU the tests see identical tokens).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vtoken.kernels.merged_linear import MergedLinear, run_linear


class MergedProjections:
    """Per decoder layer: ``qkv(j, x) -> (q, k, v)`` and ``gate_up(j, x) -> (gate, up)``, each
    ``[..., N_i]`` from ``x [..., D]``, one GEMM each where the layer's projections merged (see the
    module docstring), the layer's own projections otherwise. ``layers[j]`` has the Llama layout
    (``self_attn.q/k/v_proj``, ``mlp.gate/up_proj``). Nothing is merged until :meth:`merge`."""

    def __init__(self, layers):
        self.layers = list(layers)
        self._groups: dict = {}
        self._unmerged: dict = {}  # (layer, kind) -> the weights' data pointers when found not mergeable

    def _parts(self, j: int, kind: str) -> list:
        layer = self.layers[j]
        if kind == "qkv":
            return [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def merge(self) -> bool:
        """Merge (again) every group that is not merged and intact; True when any group changed (a
        captured graph that read the old buffers must then be captured again)."""
        changed = False
        for j in range(len(self.layers)):
            for kind in ("qkv", "gate_up"):
                group: Optional[MergedLinear] = self._groups.get((j, kind))
                if group is not None and group.intact():
                    continue
                linears = self._parts(j, kind)
                seen = tuple(lin.weight.data_ptr() for lin in linears)
                if group is None and self._unmerged.get((j, kind)) == seen:
                    continue  # not mergeable when last looked, and the same weights: not again every call
                if group is not None:  # a parameter was re-assigned: free the others, merge the current ones
                    group.release()
                new = MergedLinear.of(linears)
                changed = changed or new is not None or (j, kind) not in self._groups or group is not None
                self._groups[(j, kind)] = new
                self._unmerged[(j, kind)] = seen if new is None else None
        return changed

    @property
    def merged(self) -> int:
        """How many groups run as one GEMM."""
        return sum(g is not None for g in self._groups.values())

    def _run(self, j: int, kind: str, x: torch.Tensor, linear) -> tuple:
        group = self._groups.get((j, kind))
        if group is None:
            return tuple(run_linear(lin, x, linear) for lin in self._parts(j, kind))
        return group(x, linear)

    def qkv(self, j: int, x: torch.Tensor, linear=F.linear) -> tuple:
        """``(q, k, v)``; ``linear(x, weight, bias)`` computes each GEMM (see :func:`run_linear`)."""
        return self._run(j, "qkv", x, linear)

    def gate_up(self, j: int, x: torch.Tensor, linear=F.linear) -> tuple:
        return self._run(j, "gate_up", x, linear)

    def restore(self) -> None:
        """Every merged parameter gets its own storage back (the buffers are freed); :meth:`merge`
        merges again."""
        for group in self._groups.values():
            if group is not None:
                group.release()
        self._groups, self._unmerged = {}, {}
