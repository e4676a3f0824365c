"""Device-side model inputs of :mod:`vtoken.zoo.train`.

Turns a batch of the training stream (:mod:`vtoken.zoo.train_data`) into model kwargs: pixels
normalised (and, for Qwen2-VL, patchified) on the device in the processor's arithmetic
(:class:`PixelPipeline`), the packed-turn mask and explicit positions (:func:`model_inputs`,
:func:`qwen_position_template`), and Qwen2-VL's patch embedding as one GEMM
(:func:`fast_patch_embed`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from vtoken.zoo.train_data import packed_attention_mask

if TYPE_CHECKING:
    from vtoken.zoo.train_data import _Stream


class PixelPipeline:
    """uint8 (B, H, W, 3) at final size -> the model's pixel inputs, in the processor's arithmetic."""

    def __init__(self, processor, arch: str):
        ip = processor.image_processor
        self.arch = arch
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32)
        self.scale = float(ip.rescale_factor)
        if arch == "qwen2vl":
            self.patch, self.tp, self.merge = ip.patch_size, ip.temporal_patch_size, ip.merge_size

    def __call__(self, imgs: torch.Tensor) -> dict:
        """imgs: (B, H, W, 3) images, or (B, T, H, W, 3) videos (Qwen2-VL: ``pixel_values_videos``)."""
        from vtoken.zoo.processing import patchify

        dev = imgs.device
        video = imgs.dim() == 5
        x = imgs.float() * self.scale
        x = (x - self.mean.to(dev)) / self.std.to(dev)  # (B, [T,] H, W, C)
        if self.arch == "llava":
            return {"pixel_values": x.permute(0, 3, 1, 2).contiguous()}
        if video:
            x = x.permute(0, 1, 4, 2, 3)  # (B, T, C, H, W)
            x = torch.cat([x, x[:, -1:].expand(-1, -x.shape[1] % self.tp, -1, -1, -1)], 1)
        else:  # one frame repeated to the temporal patch
            x = x.permute(0, 3, 1, 2).unsqueeze(1).expand(-1, self.tp, -1, -1, -1)
        flat, grid = patchify(x.contiguous(), self.patch, self.tp, self.merge)
        if video:
            return {"pixel_values_videos": flat, "video_grid_thw": grid}
        return {"pixel_values": flat, "image_grid_thw": grid}


def model_inputs(arch, pixels: PixelPipeline, imgs, ids, seg, pos, image_token_id, pos_template=None, packed=True):
    """Model kwargs of a training batch.

    packed: the packed-turn 4-D mask and explicit positions (LLaVA: ``pos``; Qwen2-VL: the M-RoPE
    template at ``pos``). Otherwise (one conversation or one turn per row, right-padded): the 2-D
    padding mask, the model's own positions for LLaVA and the template's prefix for Qwen2-VL.
    """
    inp = dict(pixels(imgs), input_ids=ids)
    if packed:
        inp["attention_mask"] = packed_attention_mask(seg)
        if arch == "llava":
            inp["position_ids"] = pos
    else:
        inp["attention_mask"] = (seg >= 0).long()
    if arch == "qwen2vl":
        # 1 on image tokens, 2 on video tokens (image_token_id: the visual token of this batch)
        inp["mm_token_type_ids"] = (ids == image_token_id).long() * (2 if imgs.dim() == 5 else 1)
        if packed:
            inp["position_ids"] = pos_template[:, 0][:, pos]  # (3, B, L)
        else:
            B, L = ids.shape
            inp["position_ids"] = pos_template[:, :, :L].expand(-1, B, -1)
    return inp


def qwen_position_template(model, stream: "_Stream", length: int = 2048) -> torch.Tensor:
    """M-RoPE positions (3, 1, length) of the single-turn layout, indexed by ``pos`` of a batch.

    Every training sequence starts with the same prompt prefix and one 24 x 24-token image, and
    every turn's text continues the 1-D text positions after it, so one template computed by
    ``get_rope_index`` serves every row (no per-row Python loop or device sync at each step).
    """
    if stream.__dict__.get("tok") is None:
        stream._setup()
    ids = stream.encode([("how many objects are there?", "3", "x")])[0]
    ids = ids + [stream.tok.pad_token_id] * (length - len(ids))  # text tokens: 1-D continuation
    ids_t = torch.tensor([ids])
    mm = (ids_t == stream.image_token_id).long()
    if getattr(stream, "video", False):  # a synthetic_video clip: (pairs, side, side) patches
        from vtoken.data import synthetic_video

        side = synthetic_video.FRAME_SIZE // stream_patch(model)
        grid = torch.tensor([[synthetic_video.PAIRS, side, side]])
        kw = dict(video_grid_thw=grid, mm_token_type_ids=mm * 2)
    else:
        side = int(round(math.sqrt(stream.n_image_tokens))) * 2
        kw = dict(image_grid_thw=torch.tensor([[1, side, side]]), mm_token_type_ids=mm)
    pos, _ = model.model.get_rope_index(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), **kw)
    return pos


def stream_patch(model) -> int:
    """The vision tower's patch size in pixels."""
    return int(model.config.vision_config.patch_size)


def fast_patch_embed(model) -> None:
    """Training-only: run Qwen2-VL's Conv3d patch embedding as the equivalent matrix product.

    The convolution's stride equals its kernel, so it is a linear map of each flattened patch; the
    same weight is used, so the saved checkpoint is unchanged. (cuDNN's 3-D convolution over tens of
    thousands of one-voxel outputs is far slower than one GEMM.)
    """
    pe = model.model.visual.patch_embed

    def forward(hidden_states):
        w = pe.proj.weight
        x = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
        return torch.nn.functional.linear(x, w.reshape(w.shape[0], -1))

    pe.forward = forward
