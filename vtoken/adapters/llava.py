"""LLaVA family adapters: LLaVA-1.5, LLaVA-NeXT (anyres + image newlines), LLaVA-OneVision."""

from __future__ import annotations

import functools
import math

import torch

from vtoken.adapters.base import Adapter, VisualLayout, layout_from_runs


def _token_id(config, *names):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return int(v)
    raise ValueError(f"config has none of {names}")


class LlavaAdapter(Adapter):
    """``LlavaForConditionalGeneration``: a fixed grid of image tokens per image (576 for 336 px /
    14 px patches), one contiguous run of ``image_token_id`` per image."""

    vision_tower_graphable = True  # CLIP tower: fixed shapes per pixel input

    model_types = ("LlavaForConditionalGeneration",)
    family = "llava"
    layout_inputs = ()  # the layout is a function of input_ids (and the config) alone
    fixed_token_count = True  # tokens_per_image() for every image

    def tokens_per_image(self) -> tuple:
        vc = self.model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        extra = 1 if strategy == "full" else 0
        return side * side + extra, side

    def layout(self, input_ids, inputs, ctx):
        image_id = _token_id(self.model.config, "image_token_id", "image_token_index")
        is_visual = input_ids == image_id
        if not bool(is_visual.any()):
            return None
        count, side = self.tokens_per_image()
        n_images = int(is_visual.sum()) // count
        grid = (1, side, side) if count == side * side else None
        kinds = torch.zeros_like(input_ids)
        return layout_from_runs(is_visual, kinds, {0: [count] * n_images}, {0: [grid] * n_images})


    vision_attn_from_cls = True  # CLIP towers: row 0 of the selected layer is [CLS]

    def vision_attention_module(self):
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        idx = self.model.config.vision_feature_layer
        if not isinstance(idx, int):
            return None
        # hidden_states[i] is the output of layer i-1; the selected features come out of layer idx-1
        idx = (len(layers) + 1 + idx) if idx < 0 else idx
        return layers[max(idx - 1, 0)].self_attn

    def vision_signals(self, query, key, scaling):
        """[CLS] attention to each patch (FasterVLM / VisionZip), head-averaged; keys of patches
        (:func:`cls_attention`)."""
        drop_cls = getattr(self.model.config, "vision_feature_select_strategy", "default") == "default"
        return cls_attention(query, key, scaling, drop_cls)


def cls_attention(query, key, scaling, drop_cls: bool = True) -> list:
    """A CLIP tower's [CLS] signal, per image: ``query`` / ``key`` (B, H, 1+P, D) of the probed
    encoder layer (row 0 is [CLS]), ``scaling`` the attention scale. Returns B pairs
    ``(attn (P,), keys (P, H*D))`` float32: the softmax row of [CLS] over all tokens averaged over
    heads, and every token's key (heads concatenated), without the [CLS] column when
    ``drop_cls`` (LLaVA's "default" feature strategy). Shared by the transformers adapter and
    vtoken's vLLM plugin, so both rank the same signal."""
    n = query.shape[0]
    rows = torch.zeros(n, 1, dtype=torch.long, device=query.device)
    probs = _noncausal_rows(query, key, rows, scaling).mean(dim=1)[:, 0]  # (n, 1+P)
    keys = key.permute(0, 2, 1, 3).reshape(n, key.shape[2], -1).float()
    start = 1 if drop_cls else 0
    return [(probs[i, start:], keys[i, start:]) for i in range(n)]


def _noncausal_rows(query, key, rows, scaling):
    """Softmax probabilities of selected query rows over ALL keys (bidirectional encoder).
    query (B, H, N, D), key (B, H, N, D), rows (B, R) -> (B, H, R, N) float32."""
    B, H, N, D = query.shape
    q = query.gather(2, rows.view(B, 1, -1, 1).expand(B, H, rows.shape[1], D)).float()
    return torch.softmax(torch.matmul(q, key.float().transpose(-1, -2)) * scaling, dim=-1)


class LlavaNextAdapter(Adapter):
    """``LlavaNextForConditionalGeneration`` / ``LlavaOnevisionForConditionalGeneration``.

    Per-image token counts vary (anyres); they are read from the image features the model
    computes (``get_image_features`` output), and the image-newline tokens (rows of the
    unpadded grid end with the learned ``image_newline`` vector) are detected in the layer-0
    embeddings and kept as structural tokens: never pruned, never counted in a budget.
    A LLaVA-OneVision video is one segment with its (frames, side, side) grid (each frame pooled to
    ``side x side`` tokens, the video's closing newline structural), so video scorers see frames.
    """

    vision_tower_graphable = True  # CLIP tower: fixed shapes per pixel input

    layout_needs_features = True  # per-image counts from get_image_features; newlines from embeddings
    model_types = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
    family = "llava_next"

    @property
    def base_view_side(self) -> int:
        """The base view (the whole image resized to the vision tower's input) comes first: an
        ``image_size / patch_size`` square grid, then the high-resolution tiles with newlines."""
        vc = self.model.config.vision_config
        return int(vc.image_size // vc.patch_size)

    def layout(self, input_ids, inputs, ctx):
        cfg = self.model.config
        image_id = _token_id(cfg, "image_token_id", "image_token_index")
        video_id = getattr(cfg, "video_token_id", None) or getattr(cfg, "video_token_index", None)
        is_image = input_ids == image_id
        is_video = (input_ids == int(video_id)) if video_id is not None else torch.zeros_like(is_image)
        is_visual = is_image | is_video
        if not bool(is_visual.any()):
            return None
        kinds = is_video.long()
        sizes = {}
        lengths = ctx.feature_lengths.get("image") if ctx is not None else None
        if lengths:
            sizes[0] = list(lengths)
        vlen = ctx.feature_lengths.get("video") if ctx is not None else None
        if vlen:
            sizes[1] = [self._video_tokens(n) for n in vlen]
        grids = {code: [None] * len(v) for code, v in sizes.items()}
        layout = layout_from_runs(is_visual, kinds, sizes, grids)
        if video_id is not None and hasattr(self.model.model, "apply_pooling"):
            counts = layout.seg_count.tolist()
            layout.seg_grid = [self._video_grid(c) if kind == "video" else g
                               for g, kind, c in zip(layout.seg_grid, layout.seg_kind, counts)]
        return layout

    def _video_tokens(self, features: int) -> int:
        """Placeholder tokens of a video whose ``get_video_features`` gave ``features`` tokens: on
        LLaVA-OneVision, transformers before 5.2x appends the closing newline in the forward, after
        ``get_video_features`` (whole frames, ``frames * side**2``), later versions inside it."""
        side = math.ceil(self.base_view_side / 2)
        if hasattr(self.model.model, "apply_pooling") and side > 1 and features % (side * side) == 0:
            return features + 1
        return features

    def _video_grid(self, count: int):
        """LLaVA-OneVision's video grid (frames, side, side): each frame's features are pooled to
        ``side x side`` (``apply_pooling``: half the patch grid, rounded up) and one newline token
        ends the video, so a video segment of ``count`` tokens (the newline counted: it becomes
        structural once the embeddings are read) has ``(count - 1) / side**2`` frames; None where
        that does not divide."""
        side = math.ceil(self.base_view_side / 2)
        frames, rest = divmod(count - 1, side * side)
        return (frames, side, side) if frames > 0 and rest == 0 else None

    def structural_from_embeds(self, inputs_embeds, layout: VisualLayout):
        newline = getattr(self.model.model, "image_newline", None)
        if newline is None:
            return None
        vis = layout.visual
        eq = (inputs_embeds == newline.to(inputs_embeds.dtype).view(1, 1, -1)).all(dim=-1)
        return eq & vis

    def install(self, runtime):
        mm = self.model.model
        undo = []
        for name, kind in (("get_image_features", "image"), ("get_video_features", "video")):
            original = getattr(mm, name, None)
            if original is None:
                continue

            @functools.wraps(original)
            def wrapped(*args, __orig=original, __kind=kind, **kwargs):
                out = __orig(*args, **kwargs)
                lengths = _feature_lengths(out)
                if lengths is not None:
                    runtime.record_feature_lengths(__kind, lengths)
                return out

            setattr(mm, name, wrapped)
            undo.append(lambda mm=mm, name=name: mm.__dict__.pop(name, None))
        return undo


def _feature_lengths(out):
    """Visual tokens per image (or video) of a ``get_image_features`` / ``get_video_features``
    result: its ``pooler_output`` (transformers >= 5.2x), a list of (P_i, D) tensors (one per
    image, LLaVA-NeXT / OneVision) or a (B, ..., D) tensor (one length per row). None for what
    it cannot read: the tuple a ``return_dict=False`` call returns (a direct call outside a
    pruned forward, where no length is needed)."""
    feats = getattr(out, "pooler_output", out)
    if torch.is_tensor(feats):
        return [int(math.prod(feats.shape[1:-1]))] * feats.shape[0]
    if isinstance(feats, (list, tuple)) and all(torch.is_tensor(f) for f in feats):
        return [int(f.shape[0]) for f in feats]
    return None
