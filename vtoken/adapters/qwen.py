"""Qwen-VL family adapters: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (3-D M-RoPE, dynamic resolution)."""

from __future__ import annotations

import torch

from vtoken.adapters.base import Adapter, layout_from_runs


class QwenVLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL.

    Each image contributes t*h*w / merge^2 tokens (``image_grid_thw``); a video contributes one
    segment per video (Qwen2/2.5-VL) or one per temporal patch group (Qwen3-VL, whose prompt puts
    a timestamp between frames). Positions are 3-D M-RoPE ids computed by the model; the runtime
    gathers the rotary cos/sin of the kept tokens, so every kept token keeps its original
    (t, h, w) position, and decode positions continue from the model's ``rope_deltas``.
    Qwen3-VL's deepstack adds vision features at the visual positions of its first decoder
    layers; :meth:`install` makes that injection follow the pruned layout.
    """

    model_types = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
    )
    family = "qwen_vl"
    layout_inputs = ("image_grid_thw", "video_grid_thw")  # what layout() reads besides input_ids

    def image_placeholder(self, processor) -> str:
        """Qwen's prompt wraps the image pad token in vision start / end markers."""
        return "<|vision_start|><|image_pad|><|vision_end|>"

    @property
    def merge(self) -> int:
        return int(getattr(self.model.config.vision_config, "spatial_merge_size", 2))

    @property
    def per_frame_video(self) -> bool:
        return type(self.model).__name__.startswith("Qwen3")

    def decode_position_ids(self, pos: torch.Tensor) -> torch.Tensor:
        """M-RoPE: a generated token's temporal, height and width positions are equal:
        ``pos [B]`` -> ``[3, B, 1]``."""
        return pos.view(1, -1, 1).expand(3, -1, 1)

    def layout(self, input_ids, inputs, ctx):
        cfg = self.model.config
        image_id, video_id = int(cfg.image_token_id), int(cfg.video_token_id)
        is_image, is_video = input_ids == image_id, input_ids == video_id
        is_visual = is_image | is_video
        if not bool(is_visual.any()):
            return None
        m = self.merge
        sizes, grids = {}, {}
        thw = inputs.get("image_grid_thw")
        if thw is not None:
            rows = [tuple(int(x) for x in r) for r in thw.tolist()]
            grids[0] = [(t, h // m, w // m) for t, h, w in rows]
            sizes[0] = [t * (h // m) * (w // m) for t, h, w in rows]
        vthw = inputs.get("video_grid_thw")
        if vthw is not None:
            rows = [tuple(int(x) for x in r) for r in vthw.tolist()]
            if self.per_frame_video:
                rows = [(1, h, w) for t, h, w in rows for _ in range(t)]
            grids[1] = [(t, h // m, w // m) for t, h, w in rows]
            sizes[1] = [t * (h // m) * (w // m) for t, h, w in rows]
        layout = layout_from_runs(is_visual, is_video.long(), sizes, grids)
        if vthw is not None and self.per_frame_video:
            layout.seg_video = self._video_of_segments(layout, vthw.tolist())
        return layout

    def _video_of_segments(self, layout, vthw: list):
        """Qwen3-VL: the video (row of ``video_grid_thw``) each temporal-group segment belongs to, or
        None everywhere when the video segments do not follow the grids (a fallback layout)."""
        m = self.merge
        expected = [(v, (h // m) * (w // m)) for v, (t, h, w) in enumerate(vthw) for _ in range(t)]
        videos = [s for s, kind in enumerate(layout.seg_kind) if kind == "video"]
        counts = layout.seg_count.tolist()
        if len(videos) != len(expected) or any(counts[s] != c for s, (_, c) in zip(videos, expected)):
            return None
        out = [None] * len(counts)
        for s, (v, _) in zip(videos, expected):
            out[s] = v
        return out

    def varlen_vision_tower(self):
        """Qwen's tower attends within each window / frame: transformers' SDPA and eager paths run
        one attention call per window (about a thousand a layer at 16K patches, with a host sync),
        flash attention one varlen call; the first two get vtoken's varlen kernel."""
        visual = self.model.model.visual
        impl = getattr(self.model.config.vision_config, "_attn_implementation", None) or "eager"
        return visual if impl in ("sdpa", "eager") else None

    def vision_attention_module(self):
        visual = self.model.model.visual
        if getattr(self.model.config.vision_config, "fullatt_block_indexes", None) is not None:
            return None  # Qwen2.5-VL permutes patches into windows inside the encoder: not mapped yet
        return visual.blocks[-1].attn

    def vision_signals(self, query, key, scaling):
        """No [CLS] in Qwen's encoder: mean attention each patch receives within its image, pooled
        over each merge group of patches -> one value per LLM token (:func:`received_attention`)."""
        return [received_attention(query, key, scaling, self.merge)]

    def install(self, runtime):
        tm = self.text_model
        if not hasattr(tm, "_deepstack_process"):
            return []
        original = tm._deepstack_process

        def deepstack(hidden_states, visual_pos_masks, visual_embeds):
            # not a test of the lengths: a stage may re-lay-out rows without shortening the batch
            # (its longest row kept whole), and those rows' visual tokens have moved all the same
            if visual_pos_masks is not None:
                visual_pos_masks, visual_embeds = runtime.prune_deepstack(visual_pos_masks, visual_embeds)
            return original(hidden_states, visual_pos_masks, visual_embeds)

        tm._deepstack_process = deepstack
        return [lambda: tm.__dict__.pop("_deepstack_process", None)]


def received_attention(query, key, scaling, merge: int):
    """Qwen-VL's stand-in for [CLS] attention, for one image's patches in the encoder's order.

    ``query`` / ``key`` (1, H, P, D) of one image (after the tower's rotary embedding), ``scaling``
    the attention scale, ``merge`` the spatial merge size (g = merge^2 consecutive patches form one
    LLM token). Returns ``(attn (P/g,), keys (P/g, H*D))`` float32: the attention each patch
    receives, averaged over heads and the P queries (softmax rows computed in chunks of 1024
    queries), and the patch keys (heads concatenated), both averaged over each merge group.
    Shared by the transformers adapter and vtoken's vLLM plugin, so both rank the same signal.
    """
    _, H, P, D = query.shape
    g = merge * merge
    received = torch.zeros(P, dtype=torch.float32, device=query.device)
    k = key[0].float()
    for start in range(0, P, 1024):
        q = query[0, :, start:start + 1024].float()
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, dim=-1)  # (H, r, P)
        received += probs.sum(dim=(0, 1))
    received /= H * P
    keys = key[0].permute(1, 0, 2).reshape(P, -1)
    return received.view(-1, g).mean(1), keys.view(P // g, g, -1).float().mean(1)
