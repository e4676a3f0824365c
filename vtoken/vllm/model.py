"""vLLM's Qwen2-VL, Qwen2.5-VL and LLaVA with vtoken's pre-LLM pruning (the only module importing vLLM).

Three places change, each in :class:`PruningMixin` or :class:`PruningProcessorMixin`:

* **placeholders** — the multimodal processor replaces each image's placeholder with as many
  tokens as the image keeps (``tokens_for(keep, t*h*w)``), so the scheduler, the KV cache and the
  prompt length all see the pruned count;
* **selection** — after the vision tower and merger, each image's embeddings go through vtoken's
  scorer (:mod:`vtoken.vllm.selection`) and only the kept rows go on (a merging stage, VisionZip:
  averaged with the rows merged into them); each row carries its token's (t, h, w) grid offset in
  6 extra channels, high and low base-256 digits (:func:`vtoken.vllm.positions.pack_offsets`:
  exact in bfloat16 too); zero for a run that keeps every token, laid out whole (videos are not
  pruned: zero offsets);
* **vision probe** — for scorers reading the vision encoder's attention (FasterVLM, VisionZip), a
  forward pre-hook on the attention op of the tower's last block records each image's query and
  keys and turns them into the signal the transformers adapter gives
  (:func:`vtoken.adapters.qwen.received_attention`: mean attention each patch receives, pooled
  per merge group; Qwen2-VL only, as with ``apply_pruning``), and on LLaVA the [CLS] row of the
  last CLIP layer vLLM builds (:func:`vtoken.adapters.llava.cls_attention`, :class:`PrunedLlava`);
* **positions** — the request's M-RoPE positions put every kept placeholder at the image's start
  and the text after at its unpruned position (:mod:`vtoken.vllm.positions`);
  ``embed_input_ids`` strips the offset channels and ``forward`` adds them to the positions of
  those tokens, so each kept token sits where it sat in the unpruned sequence.

``VTOKEN_VLLM_TRACE=<file>`` appends one JSON line per pruned image (grid, kept indices, the L2
norm of each row entering the LLM): the tests compare it with ``apply_pruning``'s kept set and
layer-0 input.
"""

from __future__ import annotations

import json
import os

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from vtoken.adapters.llava import cls_attention
from vtoken.adapters.qwen import received_attention
from vtoken.errors import PruningConfigError
from vtoken.vllm.config import from_env, model_unsupported_reason, needs_vision
from vtoken.vllm.positions import (
    grid_offsets,
    index_offsets,
    llava_mrope_override,
    pack_offsets,
    pruned_1d_positions,
    pruned_mrope_positions,
    run_offsets,
    unpack_offsets,
)
from vtoken.vllm.selection import select_image

OFFSET_CHANNELS = 6  # pack_offsets: (t, h, w) offsets as high and low base-256 digits
ENV_TRACE = "VTOKEN_VLLM_TRACE"


def _config():
    config = from_env()
    if config is None:  # registered only when set (registration.py); a process without it is a setup error
        raise RuntimeError("vtoken's vLLM model is registered but VTOKEN_METHOD is not set in this process")
    return config


class PruningProcessorMixin:
    """Emit ``tokens_for(keep, n)`` image placeholders instead of n."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = _config()
        out = []
        for update in updates:
            if update.modality == "image":
                whole = update.replacement

                def pruned(item_idx, whole=whole):
                    tokens = whole(item_idx)
                    return tokens[: config.tokens_kept(len(tokens))]

                update = PromptReplacement(modality=update.modality, target=update.target, replacement=pruned)
            out.append(update)
        return out


class PruningMixin:
    """Prune each image's embeddings after the vision tower; kept tokens at their unpruned positions."""

    # the encoder CUDA graph path calls the vision tower without embed_multimodal: it would skip pruning
    supports_encoder_cudagraph = False
    #: whether vtoken maps this tower's encoder attention to LLM tokens (as the transformers adapter)
    vision_probe_supported = False
    #: whether that attention comes from a [CLS] token (CLIP), which some scorers need
    cls_attention_supported = False

    def __init__(self, *, vllm_config, prefix: str = ""):  # vLLM reads this signature
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtoken = _config()
        self._vtoken_pending = None  # (is_multimodal mask, (m, 3) offsets) from embed_input_ids to forward
        why = model_unsupported_reason(self._vtoken.stage, type(self).__name__.replace("Pruned", ""),
                                       vision_probe=self.vision_probe_supported,
                                       cls_attention=self.cls_attention_supported)
        if why is not None:
            raise PruningConfigError(f"method {self._vtoken.method!r} cannot run in vLLM: {why}")
        self._vtoken_vision = None  # list of per-image (attn, keys) while an image batch is encoded
        if needs_vision(self._vtoken.stage):
            self._install_vision_probe()

    def _vtoken_encode(self, image_input):
        """``(embeds, vision)``: the model's own image embeddings, and when the stage reads encoder
        attention the probe's per-image ``(attn, keys)`` recorded while the tower ran (else None)."""
        probing = needs_vision(self._vtoken.stage)
        if probing and image_input["type"] != "pixel_values":
            raise PruningConfigError(f"method {self._vtoken.method!r} reads the vision encoder's attention, "
                                     "which precomputed image embeddings do not come with; send images")
        self._vtoken_vision = [] if probing else None
        try:
            embeds = super()._process_image_input(image_input)
            vision = self._vtoken_vision
        finally:
            self._vtoken_vision = None
        if probing and len(vision) != len(embeds):
            raise RuntimeError(f"the vision probe saw {len(vision)} images, the tower gave {len(embeds)}")
        return embeds, vision

    def _vtoken_prune(self, embeds, grids, vision, offsets_of):
        """Each image's kept rows (merged where the stage merges) with the kept tokens' position
        offsets (:func:`run_offsets`, ``offsets_of(kept, grid)`` -> (k, 3)) packed in
        ``OFFSET_CHANNELS`` extra channels (:func:`pack_offsets`)."""
        out, trace = [], os.environ.get(ENV_TRACE)
        for i, (emb, grid) in enumerate(zip(embeds, grids)):
            budget = self._vtoken.tokens_kept(int(emb.shape[0]))
            kept, rows = select_image(self._vtoken.stage, emb, grid, budget, vision=vision[i] if vision else None)
            offsets = run_offsets(kept, int(emb.shape[0]), grid, offsets_of)
            out.append(torch.cat([rows, pack_offsets(offsets).to(emb.device, emb.dtype)], dim=1))
            if trace:
                with open(trace, "a") as fh:
                    fh.write(json.dumps({"method": self._vtoken.method, "grid": list(grid), "kept": kept.tolist(),
                                         "norms": rows.float().norm(dim=1).tolist()}) + "\n")
        return tuple(out)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            self._vtoken_pending = None
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        embeds, offsets = [], []
        for e in multimodal_embeddings:
            stripped = e[:, :-OFFSET_CHANNELS]
            if getattr(e, "modality", None) is not None:
                stripped.modality = e.modality
            embeds.append(stripped)
            offsets.append(unpack_offsets(e[:, -OFFSET_CHANNELS:]))
        self._vtoken_pending = (is_multimodal, torch.cat(offsets))
        return super().embed_input_ids(input_ids, embeds, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._vtoken_pending = self._vtoken_pending, None
        if pending is not None and inputs_embeds is not None and positions.dim() == 2:
            mask, offsets = pending
            rows = torch.nonzero(mask.to(positions.device)).flatten()
            if rows.numel() != offsets.shape[0]:
                raise RuntimeError(f"{rows.numel()} multimodal tokens but {offsets.shape[0]} position offsets")
            # the runner's position buffer for this step (rewritten from the request's positions each step)
            positions[:, rows] += offsets.to(positions.device, positions.dtype).T
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


class QwenPruningMixin(PruningMixin):
    """Qwen2-VL / Qwen2.5-VL: images by ``image_grid_thw``, the vision probe, M-RoPE grid positions."""

    def _install_vision_probe(self):
        """Pre-hook on the attention op of the tower's last block (``MMEncoderAttention``, called
        with ``query`` / ``key`` (1, s, H, D) after the rotary embedding and ``cu_seqlens``, one
        sequence per image frame): each image's :func:`received_attention`."""
        attn = self.visual.blocks[-1].attn
        if getattr(attn, "tp_size", 1) > 1 or getattr(self, "use_data_parallel", False):
            raise PruningConfigError(
                f"method {self._vtoken.method!r} reads the vision encoder's attention, which the vLLM plugin "
                "records on one unsharded tower only (tensor-parallel size 1, no data-parallel encoder)")
        merge = self.visual.spatial_merge_size
        op = attn.attn

        def probe(module, args, kwargs):
            if self._vtoken_vision is None:  # not an image batch (videos, or no probe wanted)
                return None
            q, k, cu = kwargs["query"], kwargs["key"], kwargs["cu_seqlens"]
            scale = getattr(module, "scale", None) or q.shape[-1] ** -0.5
            bounds = [0, int(q.shape[1])] if cu is None else [int(x) for x in cu.tolist()]
            for a, b in zip(bounds[:-1], bounds[1:]):
                self._vtoken_vision.append(received_attention(
                    q[:1, a:b].transpose(1, 2), k[:1, a:b].transpose(1, 2), scale, merge))
            return None

        op.register_forward_pre_hook(probe, with_kwargs=True)

    def _grids(self, grid_thw):
        m = self.visual.spatial_merge_size
        return [(int(t), int(h) // m, int(w) // m) for t, h, w in grid_thw.tolist()]

    def _process_image_input(self, image_input):
        embeds, vision = self._vtoken_encode(image_input)
        return self._vtoken_prune(embeds, self._grids(image_input["image_grid_thw"]), vision, grid_offsets)

    def _process_video_input(self, video_input):
        embeds = super()._process_video_input(video_input)
        return tuple(torch.cat([e, e.new_zeros(e.shape[0], OFFSET_CHANNELS)], dim=1) for e in embeds)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        media = [(offset, f.mm_position.length, t, h, w, t_factor)
                 for f, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(mm_features))]
        return pruned_mrope_positions(len(input_tokens), media)


class PrunedQwen2VLProcessor(PruningProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


class PrunedQwen2_5_VLProcessor(PruningProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class PrunedQwen2VL(QwenPruningMixin, Qwen2VLForConditionalGeneration):
    vision_probe_supported = True


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class PrunedQwen2_5_VL(QwenPruningMixin, Qwen2_5_VLForConditionalGeneration):
    pass


class PrunedLlavaProcessor(PruningProcessorMixin, LlavaMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(PrunedLlavaProcessor, info=LlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlava(PruningMixin, LlavaForConditionalGeneration, SupportsMRoPE):
    """LLaVA-1.5 (CLIP tower, one fixed grid of ``side x side`` tokens per image).

    Its LLM uses 1-D RoPE, and vLLM derives a plain model's positions from token indices, so the
    text after a pruned image (and every decode step) would sit ``n - k`` positions early. The
    plugin runs it on vLLM's M-RoPE path instead, with three equal position rows (the same rotary
    embedding): :func:`vtoken.vllm.positions.pruned_1d_positions` lays out the prompt and its
    delta carries decoding on from the unpruned length. That path needs ``mrope_section`` in the
    checkpoint's rope parameters, given by ``--hf-overrides`` (:func:`llava_mrope_override`; the
    model refuses to start without it and prints the value).
    """

    vision_probe_supported = True
    cls_attention_supported = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        text = vllm_config.model_config.hf_config.get_text_config()
        if not vllm_config.model_config.uses_mrope:
            raise PruningConfigError(
                "vtoken prunes LLaVA in vLLM on the M-RoPE path (equal position rows keep each kept token at its "
                "unpruned position); start vLLM with --hf-overrides '" + json.dumps(llava_mrope_override(text)) + "'")
        vc = vllm_config.model_config.hf_config.vision_config
        if getattr(vc, "model_type", None) != "clip_vision_model":
            raise PruningConfigError(f"vtoken's vLLM plugin prunes LLaVA with a CLIP tower only, not {vc.model_type!r}")
        side = int(vc.image_size) // int(vc.patch_size)
        if getattr(vllm_config.model_config.hf_config, "vision_feature_select_strategy", "default") != "default":
            raise PruningConfigError("vtoken's vLLM plugin prunes LLaVA with vision_feature_select_strategy='default' only")
        self._vtoken_side = side
        if not isinstance(vllm_config.model_config.hf_config.vision_feature_layer, int):
            self.vision_probe_supported = self.cls_attention_supported = False  # several layers: not mapped
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _install_vision_probe(self):
        """Pre-hook on the attention op of the last CLIP layer vLLM builds (it stops at
        ``vision_feature_layer``: the layer ``apply_pruning`` probes), called with query / key
        (B, 1+P, H*D): each image's :func:`cls_attention`."""
        from vllm.distributed import get_tensor_model_parallel_world_size

        if get_tensor_model_parallel_world_size() > 1:
            raise PruningConfigError(
                f"method {self._vtoken.method!r} reads the vision encoder's attention, which the vLLM plugin "
                "records on one unsharded tower only (tensor-parallel size 1)")
        drop_cls = self.config.vision_feature_select_strategy == "default"

        def probe(module, args, kwargs):
            if self._vtoken_vision is None:
                return None
            q, k = (kwargs[name] if name in kwargs else args[i] for i, name in enumerate(("query", "key")))
            B, S, _ = q.shape
            H = module.num_heads
            q, k = (x.reshape(B, S, H, -1).transpose(1, 2) for x in (q, k))
            scale = getattr(module, "scale", None) or q.shape[-1] ** -0.5
            self._vtoken_vision.extend(cls_attention(q, k, scale, drop_cls))
            return None

        self.vision_tower.vision_model.encoder.layers[-1].self_attn.attn.register_forward_pre_hook(probe, with_kwargs=True)

    def _process_image_input(self, image_input):
        embeds, vision = self._vtoken_encode(image_input)
        side = self._vtoken_side
        return self._vtoken_prune(list(embeds), [(1, side, side)] * len(embeds), vision, index_offsets)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        n = self._vtoken_side ** 2
        media = [(f.mm_position.offset, f.mm_position.length, n)
                 for f in sorted(mm_features, key=lambda f: f.mm_position.offset)]
        return pruned_1d_positions(len(input_tokens), media)


__all__ = ["PrunedLlava", "PrunedQwen2VL", "PrunedQwen2_5_VL", "PruningMixin", "PruningProcessorMixin",
           "QwenPruningMixin"]
