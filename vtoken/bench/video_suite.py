"""Suite ``video``: every video method measured on Qwen2.5-VL-7B (issue 20, item 3).

The full Qwen2.5-VL-7B (random bf16 weights built on the GPU, the ``qwen-long`` suite's model,
shared with it in one run), one video per sample: ``frames`` frames (``--video-frames``, default
16) of ``side`` x ``side`` px (``--video-side``, default 448) = a (t, h, w) patch grid of
(frames / 2, side / 14, side / 14) = (8, 32, 32), i.e. 8 temporal groups x 16 x 16 = 2048
visual tokens after the 2 x 2 merge, plus 37 text and delimiter tokens; each sample its own random
video. At
each batch size of ``batches`` (``--video-batch``, default 1 / 8 / 32): the unpruned model, then
for each method of ``methods`` (``--video-methods``, default ``fastv, divprune, uniform, dycoke,
fastvid, holitom, flashvid``) at ``keep`` (``--video-keep``, a fraction of each video's tokens,
default 0.25 = 512 of 2048) the pruned row and its ORACLE row, measured as the ``llava`` suite
measures (:func:`vtoken.bench.image_suites.measure_family`): TTFT of one prefill forward (vision
tower included, last logit only), the pruned and oracle TTFTs timed in interleaved rounds and
``ratio_to_oracle`` the median of the per-round ratios, decode ms/token (``generate`` of
``new_tokens`` minus ``generate`` of one, per step) for every row, KV-cache bytes after the
prefill, peak memory, runs.

The oracle is the same model fed only the kept tokens (:class:`vtoken.bench.common.OracleFeed`):
vision tower, projector and merging into the prompt as the model does them, then ONE gather at
the language model's entrance of the (B, M) positions alive after the method's last stage, with
their original M-RoPE positions. For the merge-mode methods (``holitom``, ``flashvid``: dropped
tokens averaged into kept ones) this is what the ``llava`` suite does for ``visionzip``'s merged
context tokens: the oracle is fed the original embeddings at the kept positions, a language-model
input of exactly the pruned input's length, positions and dtype, whose values differ from the
merged ones (speed does not depend on them). For a method with a second stage inside the LLM
(``holitom`` at layer 18, ``flashvid`` at layer 20) the oracle is fed the final kept set from the
first layer on, as for the ``llava`` suite's multi-stage methods (``pyramiddrop``): a lower bound
that the method cannot reach, since its layers before the second stage run on the first stage's
tokens. ``kept_per_stage`` lists the kept visual tokens after each stage (the first is ``keep`` of
the video's tokens), ``kept_visual`` the last.

Qwen's vision tower runs through ``vtoken.kernels.patch_vision_varlen`` for the whole suite, in
the unpruned, pruned and oracle rows alike (``apply_pruning`` would install it for the pruned rows
only; see the ``qwen-long`` suite for transformers' own tower).

A method that vtoken refuses on these inputs (a :class:`~vtoken.errors.VTokenError` at
``apply_pruning`` or in the prefill, e.g. an encoder-attention method such as ``visionzip``: Qwen's
tower gives no [CLS] attention) is one row with ``skipped`` = the reason; other failures go to
the run's errors. The time budget (``--time-budget``) is checked before each batch and each
method; what would start later is skipped and listed.
"""

from __future__ import annotations

from vtoken.bench import models as M
from vtoken.bench.image_suites import measure_family

VIDEO_METHODS = ("fastv", "divprune", "uniform", "dycoke", "fastvid", "holitom", "flashvid")
VIDEO_KEEP = 0.25


def run_video(bench, pool, batches=(1, 8, 32), frames: int = 16, side: int = 448, methods=VIDEO_METHODS,
              keep: float = VIDEO_KEEP):
    """Suite ``video`` (module docstring). Returns {batch: :func:`measure_family`'s rows}."""
    from vtoken.kernels import patch_vision_varlen

    model = pool.get("qwen2.5-vl-7b")
    grid = M.qwen_video_grid(model, frames, side, bench.tiny)
    extra = dict(frames=frames, video_side=side, video_grid_thw=list(grid))
    remove = patch_vision_varlen(model.model.visual, backend=bench.backend)
    out = {}
    try:
        for B in batches:
            if bench.over_budget():
                bench.skip("video", f"batch {B} and later")
                break
            inputs = M.qwen_video_inputs(model, B, grid, device=bench.device, dtype=bench.dtype)
            out[B] = measure_family(bench, "video", "qwen2.5-vl-7b", model, inputs, [(keep, keep)], methods=methods,
                                    decode_keeps={keep}, extra=extra, visual_token_id=model.config.video_token_id,
                                    refusals_skipped=True)
            del inputs
            bench.empty_cache()
    finally:
        remove()
    return out
