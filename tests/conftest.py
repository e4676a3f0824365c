import collections
import contextlib
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

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
# The ATen ops that wait for the device (``.item()`` / ``int(t)``, ``nonzero``, ``bool(t)``,
# ``torch.equal``), and the Python-level copies to the host (``tolist``, ``numpy``, ``cpu``), which
# do not reach the dispatcher on the CPU but wait for the queued work on a GPU. Counted on the CPU
# (the same calls on CUDA).
SYNC_OPS = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default",
                      "aten.is_nonzero.default"})
TRANSFER_CALLS = frozenset({"tolist", "numpy", "cpu"})


class SyncCounter(TorchDispatchMode):
    """Counts the sync-causing ATen ops while active (and ``on``); ``found`` by op name."""

    def __init__(self):
        super().__init__()
        self.on = True
        self.found = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and str(func) in SYNC_OPS:
            self.found[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.found.values())


class TransferCounter(TorchFunctionMode):
    """Counts ``Tensor.tolist`` / ``numpy`` / ``cpu`` calls while active (a copy to the host)."""

    def __init__(self):
        super().__init__()
        self.found = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in TRANSFER_CALLS:
            self.found[name] += 1
        return func(*args, **(kwargs or {}))


def count_syncs(fn, transfers: bool = True) -> int:
    """Host syncs while ``fn()`` runs: sync-causing ATen ops, plus (``transfers``) copies to the
    host by ``tolist`` / ``numpy`` / ``cpu`` (counted even of CPU tensors: on a GPU they wait)."""
    ops, copies = SyncCounter(), TransferCounter()
    with copies if transfers else contextlib.nullcontext(), ops:
        fn()
    return ops.total + (sum(copies.found.values()) if transfers else 0)
