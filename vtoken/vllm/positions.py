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

from vtoken.errors import PruningConfigError


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


def pruned_1d_positions(num_tokens: int, media) -> tuple[torch.Tensor, int]:
    """A 1-D RoPE model's (LLaVA's) positions in M-RoPE form: ``(positions (3, num_tokens) long,
    delta)`` with three equal rows (M-RoPE on equal rows is the model's own rotary embedding).

    ``media``: ``(offset, length, n)`` per image in prompt order: a run of ``length`` placeholders
    out of the image's ``n`` tokens. A whole run counts up as usual; a pruned run puts every
    placeholder at the image's start (each kept token's index is added later, on all three rows)
    and the text after continues from start + n, as in the unpruned prompt.
    """
    pos, st, next_pos = [], 0, 0
    for offset, length, n in media:
        pos.append(np.arange(offset - st) + next_pos)
        start = next_pos + offset - st
        pos.append(np.arange(length) + start if length == n else np.full(length, start, dtype=np.int64))
        next_pos, st = start + n, offset + length
    pos.append(np.arange(num_tokens - st) + next_pos)
    next_pos += num_tokens - st
    flat = np.concatenate(pos).astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(flat, (3, flat.size)))), int(next_pos - num_tokens)


def index_offsets(kept: torch.Tensor, grid=None) -> torch.Tensor:
    """(k, 3) long: a 1-D model's kept token indices as offsets on all three position rows
    (``grid`` unused: the signature of :func:`grid_offsets`)."""
    return kept.long().cpu().unsqueeze(1).expand(-1, 3).contiguous()


def run_offsets(kept: torch.Tensor, n: int, grid, offsets_of) -> torch.Tensor:
    """(k, 3) long: what the forward adds to the positions of an image's ``k`` kept placeholders
    (``kept`` the sorted kept indices out of the image's ``n`` tokens, ``offsets_of`` ->
    :func:`grid_offsets` or :func:`index_offsets`).

    One rule with the layouts above (:func:`pruned_mrope_positions`, :func:`pruned_1d_positions`):
    a run that keeps all ``n`` tokens is laid out whole, each token at its own unpruned position
    already, so its offsets are zero (as a video's); a pruned run sits at the image's start and
    each kept token gets its offset within the grid.
    """
    if int(kept.numel()) == int(n):
        return torch.zeros((int(n), 3), dtype=torch.long)
    return offsets_of(kept, grid)


#: an offset rides in two embedding channels, ``offset // BASE`` and ``offset % BASE``: each below
#: 256, exact in bfloat16 (8 significant bits), where LLaVA's offsets (up to 575) are not
OFFSET_BASE = 256


def pack_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """(k, 3) long offsets -> (k, 6) long channels ``[high (3), low (3)]``, each in [0, 256), so
    they survive a cast to the model's dtype (bfloat16 included). Offsets must be below 65536."""
    offsets = offsets.long()
    if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) >= OFFSET_BASE ** 2):
        raise PruningConfigError(f"position offsets must lie in [0, {OFFSET_BASE ** 2}); got up to {int(offsets.max())}")
    return torch.cat([offsets // OFFSET_BASE, offsets % OFFSET_BASE], dim=1)


def unpack_offsets(channels: torch.Tensor) -> torch.Tensor:
    """(k, 6) channels of :func:`pack_offsets` (any float dtype) -> (k, 3) long offsets."""
    c = channels.float().round().long()
    return c[:, :3] * OFFSET_BASE + c[:, 3:]


def llava_mrope_override(text_config) -> dict:
    """The ``--hf-overrides`` that turn on vLLM's M-RoPE path for a LLaVA checkpoint: its own
    rotary parameters plus an ``mrope_section`` (three equal position rows make it the 1-D rope)."""
    params = dict(getattr(text_config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    half = int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2
    params["mrope_section"] = [half - 2 * (half // 4), half // 4, half // 4]
    return {"text_config": {"rope_parameters": params}}


__all__ = ["grid_offsets", "index_offsets", "llava_mrope_override", "pack_offsets", "pruned_1d_positions",
           "pruned_mrope_positions", "run_offsets", "unpack_offsets"]
