"""The kept token indices of one image, chosen by vtoken's own scorer exactly as
:func:`vtoken.apply_pruning` chooses them at layer 0 (one segment, every token a candidate), and
the rows that go on to the LLM (a merging stage's kept tokens become the mean of the tokens merged
into them, by the runtime's own :func:`vtoken.hooks.stage.merge_targets` / ``apply_merge``).

Indices count the image's merged tokens in row-major (t, h, w) order, as Qwen2-VL lays them out
(for LLaVA: the patch grid's row-major order).
"""

from __future__ import annotations

import torch

from vtoken.signals import SegmentSignals


def image_signals(embeds: torch.Tensor, grid: tuple, budget: int, ordinal: int = 0, needs_hidden: bool = True,
                  vision: tuple | None = None) -> SegmentSignals:
    """SegmentSignals of one image: ``embeds`` (n, D) entering the LLM, ``grid`` (t, h, w) of
    merged tokens (t*h*w == n), ``ordinal`` the image's number within its prompt, ``vision``
    ``(attn (n,), keys (n, Dk))`` from the vision encoder's probe (or None)."""
    n = int(embeds.shape[0])
    t, h, w = (int(x) for x in grid)
    if t * h * w != n:
        raise ValueError(f"grid {grid} has {t * h * w} tokens but the image has {n} embeddings")
    dev = embeds.device
    sig = SegmentSignals(
        mask=torch.ones((1, n), dtype=torch.bool, device=dev),
        budget=torch.tensor([budget], dtype=torch.long, device=dev),
        index=torch.arange(n, device=dev).unsqueeze(0),
        sample=torch.zeros(1, dtype=torch.long, device=dev),
        ordinal=torch.tensor([ordinal], dtype=torch.long),
        original=torch.tensor([n], dtype=torch.long),
        grid=[(t, h, w)],
        kind=["image"],
        video=[None],
    )
    if needs_hidden:
        sig.hidden = embeds.unsqueeze(0)
    if vision is not None:
        attn, keys = vision
        if attn.numel() != n or keys.shape[0] != n:
            raise ValueError(f"the vision encoder's signals cover {attn.numel()} tokens but the image has {n}")
        sig.vision_attn = attn.float().reshape(1, n).to(dev)
        sig.vision_keys = keys.unsqueeze(0).to(dev)
    return sig


def select_image(stage, embeds: torch.Tensor, grid: tuple, budget: int, ordinal: int = 0,
                 vision: tuple | None = None) -> tuple:
    """``(kept, rows)``: the sorted LongTensor of the ``budget`` token indices ``stage``'s scorer
    keeps for one image, and the (budget, D) embeddings that enter the LLM for them: the kept rows
    of ``embeds``, or for a ``mode="merge"`` stage each kept row averaged with the rows merged into
    it (the scorer's ``merge_into``, else the most similar kept token), as ``apply_pruning`` does."""
    needs = getattr(stage.scorer, "needs", frozenset())
    sig = image_signals(embeds, grid, budget, ordinal, needs_hidden="hidden" in needs, vision=vision)
    sel = stage.scorer.select(sig)
    keep = sel.keep & sig.mask
    idx = torch.nonzero(keep[0]).flatten()
    if idx.numel() != budget:
        raise RuntimeError(f"scorer {stage.scorer!r} kept {idx.numel()} tokens, expected {budget}")
    rows = embeds
    if stage.mode == "merge" and budget < embeds.shape[0]:
        from vtoken.hooks.stage import apply_merge, merge_targets

        hidden = embeds.unsqueeze(0)
        slot_pad = sig.index
        if sig.hidden is None:
            sig.hidden = hidden
        rows = apply_merge(hidden, merge_targets(hidden, sig, keep, sel.merge_into, slot_pad))[0]
    return idx.cpu(), rows[idx]


def kept_indices(stage, embeds: torch.Tensor, grid: tuple, budget: int, ordinal: int = 0,
                 vision: tuple | None = None) -> torch.Tensor:
    """Sorted LongTensor of the ``budget`` token indices ``stage``'s scorer keeps for one image."""
    return select_image(stage, embeds, grid, budget, ordinal, vision)[0]


__all__ = ["image_signals", "kept_indices", "select_image"]
