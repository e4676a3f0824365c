"""M-RoPE positions of a Qwen2-VL prompt whose images keep fewer tokens than their grid has.

vtoken prunes at layer 0 after the model computed every token's position on the unpruned
sequence, so a kept visual token keeps its own (t, h, w) position and the text after an image
keeps the position it had with every visual token present. vLLM computes a request's positions
once, when the request arrives, before the vision tower has chosen the kept tokens; so the prompt's
positions are laid out here with every kept placeholder at the image's start position
(:func:`pruned_mrope_positions`), and each kept token's (t, h, w) offset within its grid
(:func:`grid_offsets`) travels with its embedding and is added at the forward
(``vtoken.vllm.model``).
"""

from __future__ import annotations

import numpy as np
import torch


def grid_offsets(kept: torch.Tensor, grid: tuple, t_factor: float = 1.0) -> torch.Tensor:
    """(k, 3) long: the (t, h, w) offset of each kept token index (row-major over the (t, h, w)
    grid of merged tokens) from the image's start position, as Qwen2-VL's rope index gives it."""
    t, h, w = (int(x) for x in grid)
    kept = kept.long().cpu()
    ti, hi, wi = kept // (h * w), (kept // w) % h, kept % w
    if t_factor != 1.0:
        ti = (ti.double() * t_factor).long()
    return torch.stack([ti, hi, wi], dim=1)


def pruned_mrope_positions(num_tokens: int, media) -> tuple[torch.Tensor, int]:
    """``(positions (3, num_tokens) long, mrope_position_delta)`` for a prompt of ``num_tokens``.

    ``media``: ``(offset, length, t, h, w, t_factor)`` per image/video in prompt order: its
    placeholder run starts at ``offset`` and holds ``length`` tokens out of a ``t x h x w`` grid.
    A whole run (``length == t*h*w``) gets Qwen2-VL's positions; a pruned run gets its start
    position on all its tokens (the kept tokens' offsets are added later). Text after a medium
    continues from the unpruned grid's largest position + 1 either way.
    """
    chunks, st, next_pos = [], 0, 0
    for offset, length, t, h, w, t_factor in media:
        text_len = offset - st
        chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
        start = next_pos + text_len
        grid = np.indices((t, h, w)).reshape(3, -1)
        if t_factor != 1.0:
            grid[0] = (grid[0] * t_factor).astype(np.int64)
        if length == t * h * w:
            chunks.append(grid + start)
        else:
            chunks.append(np.full((3, length), start, dtype=np.int64))
        next_pos = start + int(grid.max()) + 1
        st = offset + length
    if st < num_tokens:
        text_len = num_tokens - st
        chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
        next_pos += text_len
    positions = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)), int(next_pos - num_tokens)


__all__ = ["grid_offsets", "pruned_mrope_positions"]
