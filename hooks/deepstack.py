"""Qwen3-VL's deepstack features follow the pruned layout.

Qwen3-VL adds visual features from several vision-encoder layers to the visual tokens' hidden
states in its first LLM layers (``visual_pos_masks`` (B, N) bool, ``visual_embeds`` (V, D) for
the V visual tokens in row-major order). After a stage, only the kept visual tokens remain: the
mask follows the new layout and the features keep the rows of kept tokens.
"""

from __future__ import annotations

import torch


def prune_deepstack(ctx, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
    """(visual_pos_masks (B, Nn) over the current layout ``ctx.cur_pos`` (B, Nn), visual_embeds
    (V', D) of the kept visual tokens); the inputs unchanged while the sequence keeps its original
    layout (no call of vtoken's, or no stage has re-laid it out yet).

    Whether the layout changed is ``ctx.relaid``, never the sequence length: a stage that keeps
    its longest row whole leaves the batch as long as before while moving the other rows' tokens
    (new padding on the left), and their features must move with them."""
    if ctx is None or not ctx.relaid:
        return visual_pos_masks, visual_embeds
    pos = ctx.cur_pos
    B = pos.shape[0]
    kept = torch.zeros(B, ctx.n, dtype=torch.bool, device=pos.device)
    bb, jj = (pos >= 0).nonzero(as_tuple=True)
    kept[bb, pos[bb, jj]] = True
    vpm = visual_pos_masks.to(pos.device)
    rows = kept[vpm]
    new_mask = vpm.gather(1, pos.clamp(min=0)) & (pos >= 0)
    return new_mask, visual_embeds[rows.to(visual_embeds.device)]
