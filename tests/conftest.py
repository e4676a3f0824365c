import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import tiny_models as tm  # noqa: E402

SUPPRESS = [tm.IMAGE_ID, tm.VIDEO_ID, 92, 93]

# name -> (model builder, inputs builder(model, pad_side, variant))
#   variant "batch": 3 samples, different visual counts, one sample with several images, one with none
#   variant "single": one sample with one image


def _llava(pad_side, variant, model):
    if variant == "single":
        return tm.llava_inputs(model, [4], [1], [5])
    return tm.llava_inputs(model, [3, 6, 5], [1, 2, 0], [4, 2, 3], pad_side=pad_side)


def _next(pad_side, variant, model):
    if variant == "single":
        return tm.llava_next_inputs(model, [[(16, 30)]])
    return tm.llava_next_inputs(model, [[(16, 30)], [(30, 16), (16, 16)], []], pad_side=pad_side)


def _qwen(pad_side, variant, model):
    if variant == "single":
        return tm.qwen_inputs(model, [[("image", (1, 8, 8))]])
    return tm.qwen_inputs(
        model, [[("image", (1, 8, 8))], [("image", (1, 4, 8)), ("video", (2, 4, 4))], []], pad_side=pad_side
    )


ARCHS = {
    "llava": (lambda attn="sdpa": tm.tiny_llava(attn=attn), _llava),
    "llava_next": (lambda attn="sdpa": tm.tiny_llava_next("llava_next", attn=attn), _next),
    "llava_onevision": (lambda attn="sdpa": tm.tiny_llava_next("onevision", attn=attn), _next),
    "qwen2_vl": (lambda attn="sdpa": tm.tiny_qwen("qwen2_vl", attn=attn), _qwen),
    "qwen2_5_vl": (lambda attn="sdpa": tm.tiny_qwen("qwen2_5_vl", attn=attn), _qwen),
    "qwen3_vl": (lambda attn="sdpa": tm.tiny_qwen("qwen3_vl", attn=attn), _qwen),
}

_CACHE = {}


def get_model(name, attn="sdpa"):
    key = (name, attn)
    if key not in _CACHE:
        _CACHE[key] = ARCHS[name][0](attn)
    return _CACHE[key]


def get_inputs(name, model, pad_side="left", variant="batch"):
    return ARCHS[name][1](pad_side, variant, model)


def slice_sample(inputs, b, model):
    """The b-th sample of a batch, unpadded, with only its own visual inputs."""
    mask = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b][mask][None], "attention_mask": torch.ones(1, int(mask.sum()), dtype=torch.long)}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][b][mask][None]
    ids = inputs["input_ids"]
    cfg = model.config
    if "image_grid_thw" in inputs or "video_grid_thw" in inputs:
        merge = cfg.vision_config.spatial_merge_size ** 2
        qwen3 = type(model).__name__.startswith("Qwen3")
        for key, pix, tok in (("image_grid_thw", "pixel_values", tm.IMAGE_ID), ("video_grid_thw", "pixel_values_videos", tm.VIDEO_ID)):
            if key not in inputs:
                continue
            grids = inputs[key]
            # number of items of each sample: count by tokens
            per_item = [int(t * h * w) // merge for t, h, w in grids.tolist()]
            counts = [(ids[i] == tok).sum().item() for i in range(ids.shape[0])]
            start_item, acc = 0, 0
            for i in range(b):
                need = counts[i]
                while need > 0:
                    need -= per_item[start_item]
                    start_item += 1
            end_item, need = start_item, counts[b]
            while need > 0:
                need -= per_item[end_item]
                end_item += 1
            if end_item > start_item:
                rows = [int(t * h * w) for t, h, w in grids.tolist()]
                off = sum(rows[:start_item])
                out[pix] = inputs[pix][off: off + sum(rows[start_item:end_item])]
                out[key] = grids[start_item:end_item]
            _ = qwen3
    elif "pixel_values" in inputs:
        tok_per = [int((ids[i] == tm.IMAGE_ID).sum()) for i in range(ids.shape[0])]
        if "image_sizes" in inputs:
            # one pixel entry per image; images per sample = runs of image tokens
            from vtoken.adapters.base import token_runs

            n_img = [len(token_runs(ids[i] == tm.IMAGE_ID)) for i in range(ids.shape[0])]
        else:
            per = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
            n_img = [t // per for t in tok_per]
        s = sum(n_img[:b])
        if n_img[b]:
            out["pixel_values"] = inputs["pixel_values"][s: s + n_img[b]]
            if "image_sizes" in inputs:
                out["image_sizes"] = inputs["image_sizes"][s: s + n_img[b]]
    return out


@pytest.fixture(params=list(ARCHS))
def arch(request):
    return request.param


# -- host syncs ---------------------------------------------------------------------------------
# counted on the CPU by vtoken.bench.host_waits (the ops that wait for the device on a GPU, and the
# copies to the host): SyncCounter, TransferCounter, count_syncs
from vtoken.bench.host_waits import SyncCounter, TransferCounter, count_syncs  # noqa: E402,F401
