"""Adapter interface: everything architecture-specific lives behind it.

An adapter knows where the decoder layers are, how to find each sample's visual tokens and
split them into segments (one image / one video / one video frame group), which of them are
structural (never pruned, e.g. LLaVA-NeXT's image-newline tokens), and what the model does
per layer that depends on token positions (Qwen3-VL's deepstack injection).
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class VisualLayout:
    """Where the visual tokens of a batch are, in ORIGINAL sequence coordinates.

    segment_of:  (B, N) long, global segment id of each token, -1 for text/padding.
    structural:  (B, N) bool, visual tokens that are never pruned nor counted (image newlines).
    seg_sample:  (S,) long, batch row of each segment (segments numbered in row-major order).
    seg_ordinal: (S,) long, number of the segment within its sample.
    seg_count:   (S,) long, prunable tokens of each segment.
    seg_grid:    list of (t, h, w) or None per segment.
    seg_kind:    list of "image" / "video" per segment.
    seg_video:   list of int or None per segment, or None: the number of the video (in the batch) a
                 segment belongs to where a video spans several segments (Qwen3-VL's temporal
                 patch groups; consecutive segments, in frame order), None for the others.
    """

    segment_of: torch.Tensor
    structural: torch.Tensor
    seg_sample: torch.Tensor
    seg_ordinal: torch.Tensor
    seg_count: torch.Tensor
    seg_grid: list
    seg_kind: list
    seg_video: Optional[list] = None

    @property
    def num_segments(self) -> int:
        return int(self.seg_sample.numel())

    @property
    def prunable(self) -> torch.Tensor:
        """(B, N) bool: visual, non-structural tokens."""
        return (self.segment_of >= 0) & ~self.structural

    @property
    def visual(self) -> torch.Tensor:
        return self.segment_of >= 0


def token_runs(row) -> list:
    """[(start, length)] of the maximal runs of True in a 1-D bool tensor or array."""
    r = np.asarray(row.cpu() if torch.is_tensor(row) else row, dtype=np.int8)
    if r.size == 0 or not r.any():
        return []
    diff = np.diff(np.concatenate(([0], r, [0])))
    starts, ends = np.flatnonzero(diff == 1).tolist(), np.flatnonzero(diff == -1).tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def layout_from_runs(
    is_visual: torch.Tensor,
    kinds: torch.Tensor,
    sizes: dict,
    grids: dict,
    structural: Optional[torch.Tensor] = None,
) -> VisualLayout:
    """Split each sample's runs of visual tokens into segments.

    is_visual (B, N) bool; kinds (B, N) long code per visual token (0 image, 1 video);
    sizes: {code: list of expected segment sizes in row-major order} (missing or exhausted ->
    a whole run is one segment; sizes that do not tile the runs are ignored: one segment per
    run); grids: {code: list of (t, h, w)} aligned with sizes.
    Structural tokens (B, N) count towards a segment's span but not its size.
    """
    B, N = is_visual.shape
    structural = torch.zeros_like(is_visual) if structural is None else structural
    vis_cpu, kinds_cpu = is_visual.cpu().numpy().astype(bool), kinds.cpu().numpy()
    struct_cpu = structural.cpu().numpy().astype(bool)
    split = _split_runs(vis_cpu, kinds_cpu, struct_cpu, sizes, grids)
    if not split[-1]:
        # The sizes do not tile the rows' runs in order (transformers 5.17's beam search repeats a
        # multi-image sample's images image by image, so the feature lengths come in another order
        # than the rows'): trust the runs, one segment each, so identical rows get identical layouts.
        split = _split_runs(vis_cpu, kinds_cpu, struct_cpu, {}, {})
    segment_of, seg_sample, seg_ordinal, seg_count, seg_grid, seg_kind, _ = split
    dev = is_visual.device
    return VisualLayout(
        segment_of=torch.from_numpy(segment_of).to(dev),
        structural=structural.to(dev) & is_visual,
        seg_sample=torch.tensor(seg_sample, dtype=torch.long, device=dev),
        seg_ordinal=torch.tensor(seg_ordinal, dtype=torch.long, device=dev),
        seg_count=torch.tensor(seg_count, dtype=torch.long, device=dev),
        seg_grid=seg_grid,
        seg_kind=seg_kind,
    )


def _split_runs(vis_cpu, kinds_cpu, struct_cpu, sizes: dict, grids: dict):
    """The segments of :func:`layout_from_runs` on host arrays, and whether ``sizes`` tiled the runs
    (every segment given a size got exactly that many prunable tokens)."""
    B, N = vis_cpu.shape
    segment_of = np.full((B, N), -1, dtype=np.int64)
    seg_sample, seg_ordinal, seg_count, seg_grid, seg_kind = [], [], [], [], []
    cursor = {code: 0 for code in sizes}
    names = {0: "image", 1: "video"}
    tiled = True
    for b in range(B):
        ordinal = 0
        for start, length in token_runs(vis_cpu[b]):
            code = int(kinds_cpu[b, start])
            end = start + length
            struct = struct_cpu[b, start:end].tolist()
            # prunable[i] = prunable tokens in the run up to and including offset i
            prunable = np.cumsum(~struct_cpu[b, start:end]).tolist()
            pos = start
            while pos < end:
                expected = sizes.get(code, [])
                i = cursor.get(code, 0)
                if i < len(expected):
                    want, grid = int(expected[i]), grids[code][i]
                    cursor[code] = i + 1
                else:
                    want, grid = None, None
                before = prunable[pos - start - 1] if pos > start else 0
                if want is None:
                    seg_end = end
                else:  # advance over `want` prunable tokens (structural ones ride along)
                    seg_end = min(end, start + bisect.bisect_left(prunable, before + want) + 1)
                while seg_end < end and struct[seg_end - start]:
                    seg_end += 1
                count = prunable[seg_end - start - 1] - before
                tiled = tiled and (want is None or count == want)
                segment_of[b, pos:seg_end] = len(seg_sample)
                seg_sample.append(b)
                seg_ordinal.append(ordinal)
                seg_count.append(count)
                seg_grid.append(grid if (grid is not None and count == grid[0] * grid[1] * grid[2]) else None)
                seg_kind.append(names.get(code, "image"))
                ordinal += 1
                pos = seg_end
    return segment_of, seg_sample, seg_ordinal, seg_count, seg_grid, seg_kind, tiled


def visual_token_ids(config) -> list:
    """The image / video placeholder token ids a model config declares (LLaVA and Qwen names)."""
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return ids


class Adapter:
    """Base adapter. Subclasses set ``model_types`` (transformers class names) and override
    :meth:`layout`."""

    model_types: tuple = ()
    family: str = ""
    # the vision tower's forward has static shapes for a given pixel input and no host syncs, so
    # vtoken.engine.StaticDecoder may replay it as a CUDA graph
    vision_tower_graphable: bool = False
    # the layout needs what the model computes in the forward (feature lengths, embeddings): it is
    # built when the language model is called, not from the inputs before the vision tower runs
    layout_needs_features: bool = False
    # the inputs (besides input_ids) that layout() reads; None: not declared, so a host plan built
    # from this adapter's layout is not cached across calls (vtoken.hooks.prefill_plan.PlanCache)
    layout_inputs: Optional[tuple] = None
    # every image becomes the same number of visual tokens (LLaVA-1.5's fixed grid), so a budget may
    # be a token count; False for dynamic resolution (anyres tiles, Qwen's smart_resize)
    fixed_token_count: bool = False

    def __init__(self, model):
        self.model = model

    # --- prompts and token grids (also what the demo asks) ----------------------------------
    @property
    def image_token_id(self) -> Optional[int]:
        """The id of the placeholder token that stands for each visual token of an image in
        ``input_ids`` (``image_token_id`` or ``image_token_index`` of the config), or None when the
        config declares none."""
        for name in ("image_token_id", "image_token_index"):
            value = getattr(self.model.config, name, None)
            if value is not None:
                return int(value)
        return None

    def ids_from_embeds(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N) stand-in ``input_ids`` for a call given ``inputs_embeds`` (B, N, D) without them:
        a position whose embedding equals an image / video placeholder token's embedding holds that
        token (the way transformers' ``get_placeholder_mask`` finds them), every other -1."""
        table = self.model.get_input_embeddings()
        ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        for token in visual_token_ids(self.model.config):
            vector = table(torch.tensor(token, device=inputs_embeds.device)).to(inputs_embeds.dtype)
            ids[(inputs_embeds == vector).all(dim=-1)] = token
        return ids

    def image_placeholder(self, processor) -> str:
        """The prompt text that stands for one image when no chat template writes the prompt (the
        processor expands it into the image's visual tokens): the processor's ``image_token``, else
        ``<image>``."""
        return getattr(processor, "image_token", None) or "<image>"

    @property
    def base_view_side(self) -> Optional[int]:
        """Side of the token grid of the whole image at base resolution when an image's tokens start
        with that view and continue with other views (LLaVA-NeXT / OneVision anyres tiles and
        newlines): the first ``side * side`` visual tokens of an image are its base view. None for
        models without one."""
        return None

    @property
    def checkpoint_dir(self) -> Optional[str]:
        """The local folder the model was loaded from (``name_or_path`` when it is a directory),
        where learned methods look for their weights; None for a model built in memory or loaded
        from a hub name."""
        path = getattr(self.model, "name_or_path", None) or getattr(self.model.config, "_name_or_path", None)
        return path if path and os.path.isdir(path) else None

    # --- structure -------------------------------------------------------------------
    @property
    def multimodal_model(self):
        """The module whose forward receives input_ids and the pixel inputs."""
        return self.model.model

    @property
    def text_model(self):
        return self.model.model.language_model

    @property
    def layers(self):
        return self.text_model.layers

    @property
    def text_config(self):
        return self.text_model.config

    @property
    def final_norm(self):
        """The language model's final normalisation (applied to the last decoder layer's output
        before the LM head) as a callable (..., D) -> (..., D), or None when the model has none.
        Feeds the ``normed_hidden`` / ``normed_text_hidden`` signals (DART's cosine similarities
        are taken on hidden states passed through it, as in the authors' released code)."""
        return getattr(self.text_model, "norm", None)

    def keys_at_sample_positions(self, key: torch.Tensor, position_embeddings, first: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys of a prefill layer as each sample would have them alone.

        key (B, Hkv, N, Dh) as the layer's attention received it; ``position_embeddings`` the
        rotary (cos, sin) the decoder layers receive, (..., B, N, Dh) (M-RoPE: a leading axis of
        3); first (B,) long: each row's first valid slot. A sample alone starts at position 0,
        but in a plain forward of a left-padded batch the model's positions of a row start at
        its padding count: every key of that row is rotated by the same extra angle, the angle
        of the row's first token, which this rotates back (the identity where the first token
        is at position 0: ``generate``, M-RoPE positions, right or no padding). Rotary-norm
        rankings (DART's key L1 norm) then do not depend on the padding. Default: the
        half-split rotation ``x * cos + rotate_half(x) * sin`` of every supported family (a
        text token's M-RoPE positions are equal on the three axes, so any axis gives its
        angle). Returns float32 keys.
        """
        cos, sin = position_embeddings
        if cos.dim() == 4:  # M-RoPE (3, B, N, Dh): the first token's three angles are equal
            cos, sin = cos[0], sin[0]
        rows = torch.arange(key.shape[0], device=cos.device)
        first = first.to(cos.device)
        c = cos.expand(key.shape[0], -1, -1)[rows, first].float().view(key.shape[0], 1, 1, -1).to(key.device)
        s = sin.expand(key.shape[0], -1, -1)[rows, first].float().view(key.shape[0], 1, 1, -1).to(key.device)
        k = key.float()
        half = k.shape[-1] // 2
        rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        return k * c - rotated * s  # the inverse rotation (angle -theta)

    @property
    def vision_tower(self):
        return getattr(self.model.model, "vision_tower", None) or getattr(self.model.model, "visual", None)

    def decode_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings of decode tokens ``[B, 1]`` -> ``[B, 1, D]`` as the text model computes
        them before its first layer (Granite's language model scales them by
        ``embedding_multiplier``)."""
        h = self.model.get_input_embeddings()(tokens)
        scale = getattr(self.text_config, "embedding_multiplier", None)
        return h if scale in (None, 1, 1.0) else h * float(scale)

    def decode_position_ids(self, pos: torch.Tensor) -> torch.Tensor:
        """Position ids for the text model's rotary embedding of one generated token per sample:
        ``pos [B]`` -> ``[B, 1]`` (1-D RoPE)."""
        return pos.unsqueeze(1)

    # --- per call ----------------------------------------------------------------------
    def layout(self, input_ids: torch.Tensor, inputs: dict, ctx) -> Optional[VisualLayout]:
        """The batch's visual layout, or None when no sample has visual tokens."""
        raise NotImplementedError

    def structural_from_embeds(self, inputs_embeds: torch.Tensor, layout: VisualLayout) -> Optional[torch.Tensor]:
        """Optionally refine structural tokens from layer-0 embeddings (LLaVA-NeXT newlines)."""
        return None

    def varlen_vision_tower(self):
        """The vision tower whose per-window attention ``apply_pruning`` routes through one varlen
        kernel launch a layer (:func:`vtoken.kernels.patch_vision_varlen`), or None where the
        model's own tower is already one launch (CLIP) or uses flash attention."""
        return None

    # --- vision-encoder signals (vision_attn / vision_keys) ----------------------------------
    #: True where ``vision_signals`` gives the encoder's [CLS] attention (not a stand-in such as
    #: the mean attention received); scorers with ``needs_cls_attention`` run only there.
    vision_attn_from_cls: bool = False

    def vision_attention_module(self):
        """The vision-encoder attention module whose attention pre-LLM scorers read, or None
        when this architecture cannot map encoder patches to LLM tokens."""
        return None

    def vision_signals(self, query, key, scaling) -> list:
        """Per attention call of that module: [(attn (P,), keys (P, Dk))] per image chunk, already
        mapped to LLM visual tokens (in the order the model places them)."""
        raise NotImplementedError

    def install(self, runtime) -> list:
        """Model-specific patches beyond the generic hooks; returns undo callables."""
        return []
