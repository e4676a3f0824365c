"""The kept token indices of one image, chosen by vtoken's own scorer exactly as
:func:`vtoken.apply_pruning` chooses them at layer 0 (one segment, every token a candidate).

Indices count the image's merged tokens in row-major (t, h, w) order, as Qwen2-VL lays them out.
"""

from __future__ import annotations

import torch

from vtoken.signals import SegmentSignals


def image_signals(embeds: torch.Tensor, grid: tuple, budget: int, ordinal: int = 0, needs_hidden: bool = True) -> SegmentSignals:
    """SegmentSignals of one image: ``embeds`` (n, D) entering the LLM, ``grid`` (t, h, w) of
    merged tokens (t*h*w == n), ``ordinal`` the image's number within its prompt."""
    n = int(embeds.shape[0])
    t, h, w = (int(x) for x in grid)
    if t * h * w != n:
        raise ValueError(f"grid {grid} has {t * h * w} tokens but the image has {n} embeddings")
    sig = SegmentSignals(
        mask=torch.ones((1, n), dtype=torch.bool, device=embeds.device),
        budget=torch.tensor([budget], dtype=torch.long, device=embeds.device),
        index=torch.arange(n, device=embeds.device).unsqueeze(0),
        sample=torch.zeros(1, dtype=torch.long, device=embeds.device),
        ordinal=torch.tensor([ordinal], dtype=torch.long),
        original=torch.tensor([n], dtype=torch.long),
        grid=[(t, h, w)],
        kind=["image"],
        video=[None],
    )
    if needs_hidden:
        sig.hidden = embeds.unsqueeze(0)
    return sig


def kept_indices(stage, embeds: torch.Tensor, grid: tuple, budget: int, ordinal: int = 0) -> torch.Tensor:
    """Sorted LongTensor of the ``budget`` token indices ``stage``'s scorer keeps for one image."""
    needs = getattr(stage.scorer, "needs", frozenset())
    sig = image_signals(embeds, grid, budget, ordinal, needs_hidden="hidden" in needs)
    keep = stage.scorer.select(sig).keep[0] & sig.mask[0]
    idx = torch.nonzero(keep).flatten().cpu()
    if idx.numel() != budget:
        raise RuntimeError(f"scorer {stage.scorer!r} kept {idx.numel()} tokens, expected {budget}")
    return idx


__all__ = ["image_signals", "kept_indices"]
