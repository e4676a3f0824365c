"""Greedy max-min diversity selection over a Gram matrix, every pick of a segment in one launch.

DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025, arXiv:2503.02175) picks visual tokens one at a time: each pick is the unchosen
token whose smallest cosine distance to the tokens chosen so far is largest. Written as PyTorch ops
a pick is about a dozen small kernels, so 64 picks launch about 800 of them, which at batch 1 costs
more host time than the GPU spends on the whole selection (about 7 ms on an H100:
``benchmarks/e2e/profile_ttft_h100_s15``). Here one program per segment runs all its picks over
the precomputed similarities (the released code computes the same full distance matrix first).

:func:`greedy_maxmin_gram` ``(gram, mask, steps, mind, first, keep, order, picked)``:

- ``gram`` ``(S, n, n)`` float32: cosine similarities of each segment's unit rows;
- ``mask`` ``(S, n)`` bool: real candidates; ``steps`` ``(S,)`` long: picks still to make (the caller
  keeps them within the real candidates left);
- ``mind`` ``(S, n)`` float32: each slot's smallest distance (``1 - gram``) to the picks so far (+inf
  before any); ``first`` ``(S, n)`` float32 or None: the score of a segment's first pick (its nearest
  other token's distance) while it has picked nothing;
- ``keep`` ``(S, n)`` bool, ``order`` ``(S, n)`` long, ``picked`` ``(S,)`` long: the picks so far
  (seeds), their ranks (-1 elsewhere) and their count.

Returns new ``(keep, order)`` with every pick made: a pick maximises ``first`` (no pick yet) or
``mind``, with -inf on padding and chosen slots and +inf capped at 1e30 (a lone candidate still
wins over padding), ties towards the lower slot index; it is ranked ``picked``, then ``mind`` takes
the minimum with ``1 - gram[s, pick]``. The PyTorch reference runs the same arithmetic pick by pick.
"""

from __future__ import annotations

from typing import Optional

import torch

from vtoken.kernels.dispatch import lazy_jit, next_pow2, resolve_backend, tl, torch_reference

__all__ = ["greedy_maxmin_gram", "greedy_maxmin_gram_reference", "greedy_maxmin_picks"]

#: widest segment the one-program kernel takes (its rows live in registers); wider ones use the reference
MAX_SLOTS = 4096


def greedy_maxmin_gram(gram: torch.Tensor, mask: torch.Tensor, steps: torch.Tensor, mind: torch.Tensor,
                       first: Optional[torch.Tensor], keep: torch.Tensor, order: torch.Tensor, picked: torch.Tensor,
                       *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Make ``steps[s]`` more greedy max-min picks in every segment s (see the module docstring)."""
    S, n = mask.shape
    if gram.shape != (S, n, n) or gram.dtype != torch.float32:
        raise ValueError(f"greedy_maxmin_gram: gram must be float32 [{S}, {n}, {n}], got {tuple(gram.shape)} "
                         f"{gram.dtype}")
    for name, t, dtype in (("mind", mind, torch.float32), ("first", first, torch.float32),
                           ("keep", keep, torch.bool), ("order", order, torch.long)):
        if t is not None and (t.shape != (S, n) or t.dtype != dtype):
            raise ValueError(f"greedy_maxmin_gram: {name} must be {dtype} [{S}, {n}], got {tuple(t.shape)} {t.dtype}")
    if mask.dtype != torch.bool or steps.shape != (S,) or picked.shape != (S,):
        raise ValueError("greedy_maxmin_gram: mask must be bool [S, n], steps and picked [S]")
    if resolve_backend(backend, gram, mask, mind) == "torch" or n > MAX_SLOTS or S == 0:
        return _reference(gram, mask, steps, mind, first, keep, order, picked)
    keep_out = keep.to(torch.int8).contiguous()
    order_out = order.clone().contiguous()
    lazy_jit(_greedy_kernel)[(S,)](
        gram.contiguous(), mask.to(torch.int8).contiguous(), steps.long().contiguous(), mind.contiguous(),
        mind if first is None else first.contiguous(), keep_out, order_out, picked.long().contiguous(), n,
        HAS_FIRST=first is not None, BLOCK=max(16, next_pow2(n)), num_warps=4 if n <= 1024 else 8)
    return keep_out.bool(), order_out


def _reference(gram, mask, steps, mind, first, keep, order, picked):
    def similarity_of(pick):  # (S, 1) -> the picked slots' rows of the Gram matrix, (S, n)
        return gram.gather(1, pick.unsqueeze(-1).expand(-1, 1, gram.shape[-1])).squeeze(1)

    return greedy_maxmin_picks(similarity_of, mask, steps, mind, first, keep, order, picked)


def greedy_maxmin_picks(similarity_of, mask, steps, mind, first, keep, order, picked):
    """The picks of :func:`greedy_maxmin_gram` as PyTorch ops, one pick of every segment per
    iteration (about a dozen small kernels; static shapes, no host sync inside the loop), with the
    picked slots' similarities from ``similarity_of(pick (S, 1)) -> (S, n)``: rows of a Gram matrix
    (the reference) or computed from the features where the Gram matrix would not fit
    (:func:`vtoken.scorers.functional.greedy_maxmin`). Returns new ``(keep, order)``."""
    keep, order, mind, picked = keep.clone(), order.clone(), mind.clone(), picked.long().clone()
    steps = steps.long()
    for t in range(int(steps.max()) if steps.numel() else 0):
        active = t < steps  # (S,): a segment with its picks made changes nothing
        base = mind if first is None else torch.where((picked == 0).unsqueeze(1), first, mind)
        # +inf (a lone candidate has no neighbour) -> large finite, so argmax still prefers real slots
        score = base.masked_fill(~mask | keep, float("-inf")).clamp(max=1e30)
        pick = score.argmax(dim=1, keepdim=True)  # (S, 1): the first maximum
        chosen = torch.zeros_like(keep).scatter_(1, pick, active.unsqueeze(1))
        keep |= chosen
        order = torch.where(chosen, picked.unsqueeze(1), order)
        d = 1.0 - similarity_of(pick)  # (S, n)
        mind = torch.where(active.unsqueeze(1), torch.minimum(mind, d), mind)
        picked = picked + active.long()
    return keep, order


def _greedy_kernel(G, MASK, STEPS, MIND, FIRST, KEEP, ORDER, PICKED, n, HAS_FIRST: tl.constexpr,
                   BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    row = s * n
    valid = tl.load(MASK + row + offs, mask=ok, other=0) != 0
    keep = tl.load(KEEP + row + offs, mask=ok, other=0)
    order = tl.load(ORDER + row + offs, mask=ok, other=-1)
    mind = tl.load(MIND + row + offs, mask=ok, other=float("inf"))
    if HAS_FIRST:
        first = tl.load(FIRST + row + offs, mask=ok, other=float("inf"))
    picked = tl.load(PICKED + s)
    steps = tl.load(STEPS + s)
    for _ in range(0, steps):
        base = mind
        if HAS_FIRST:
            base = tl.where(picked == 0, first, mind)
        score = tl.where(valid & (keep == 0), base, float("-inf"))
        score = tl.minimum(score, 1e30)
        pick = tl.argmax(score, 0, tie_break_left=True)
        hit = offs == pick
        keep = tl.where(hit, 1, keep).to(tl.int8)
        order = tl.where(hit, picked, order)
        sim = tl.load(G + (row + pick) * n + offs, mask=ok, other=0.0)
        mind = tl.minimum(mind, 1.0 - sim)
        picked += 1
    tl.store(KEEP + row + offs, keep, mask=ok)
    tl.store(ORDER + row + offs, order, mask=ok)


greedy_maxmin_gram_reference = torch_reference(greedy_maxmin_gram)
