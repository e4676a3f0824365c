"""Tiny random-weight VLMs built from transformers config classes, plus matching inputs.

Inputs are built directly (no processor): input_ids with the right number of visual
placeholder tokens, pixel tensors of the right shapes, and the grid metadata.
"""

from __future__ import annotations

import torch

TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
IMAGE_ID, VIDEO_ID, PAD_ID = 90, 91, 0


def tiny_llava(attn="sdpa", seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=24, patch_size=4, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT, pad_token_id=PAD_ID),
                      image_token_id=IMAGE_ID, vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.text_config.tie_word_embeddings = False
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    return model  # 36 visual tokens per image (6 x 6)


def llava_inputs(model, texts_before, n_images, texts_after, pad_side="left", seed=0):
    """One sample per entry: [prefix tokens] [image tokens]*n [suffix tokens]."""
    g = torch.Generator().manual_seed(seed)
    per = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    rows = []
    for pre, n, post in zip(texts_before, n_images, texts_after):
        ids = torch.randint(1, 80, (pre,), generator=g).tolist()
        for _ in range(n):
            ids += [IMAGE_ID] * per + torch.randint(1, 80, (2,), generator=g).tolist()
        ids += torch.randint(1, 80, (post,), generator=g).tolist()
        rows.append(ids)
    input_ids, attention_mask = pad(rows, pad_side)
    total = sum(n_images)
    out = dict(input_ids=input_ids, attention_mask=attention_mask)
    if total:
        size = model.config.vision_config.image_size
        out["pixel_values"] = torch.randn(total, 3, size, size, generator=g)
    return out


def pad(rows, side="left"):
    N = max(len(r) for r in rows)
    ids = torch.full((len(rows), N), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), N), dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "left":
            ids[i, N - len(r):] = torch.tensor(r)
            mask[i, N - len(r):] = 1
        else:
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
    return ids, mask


# ---------------------------------------------------------------- Qwen-VL family
QWEN_TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096)


def tiny_qwen(kind="qwen2_vl", attn="sdpa", seed=0):
    import transformers as T

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2,
                      temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
        cfg = T.Qwen2VLConfig(text_config=dict(QWEN_TEXT, rope_parameters=rope), vision_config=vision,
                              image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=92,
                              vision_end_token_id=93)
        cls = T.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2,
                      temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=8,
                      fullatt_block_indexes=[1])
        cfg = T.Qwen2_5_VLConfig(text_config=dict(QWEN_TEXT, rope_parameters=rope), vision_config=vision,
                                 image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=92,
                                 vision_end_token_id=93)
        cls = T.Qwen2_5_VLForConditionalGeneration
    else:
        rope3 = {"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True, "rope_theta": 10000.0}
        vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2,
                      temporal_patch_size=2, spatial_merge_size=2, in_channels=3, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        cfg = T.Qwen3VLConfig(text_config=dict(QWEN_TEXT, head_dim=8, rope_parameters=rope3), vision_config=vision,
                              image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=92,
                              vision_end_token_id=93)
        cls = T.Qwen3VLForConditionalGeneration
    cfg.text_config.tie_word_embeddings = False
    model = cls(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def qwen_inputs(model, samples, pad_side="left", seed=0):
    """samples: list of lists of (kind, (t, h, w)) visual items (h, w in patches, even);
    each item is wrapped as <vision_start> tokens <vision_end> with text between."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    merge = vc.spatial_merge_size
    per_patch = 3 * vc.temporal_patch_size * vc.patch_size * vc.patch_size
    rows, types, img_grids, vid_grids = [], [], [], []
    qwen3 = type(model).__name__.startswith("Qwen3")
    for items in samples:
        ids = torch.randint(1, 80, (3,), generator=g).tolist()
        tt = [0] * len(ids)
        for kind, (t, h, w) in items:
            tok = IMAGE_ID if kind == "image" else VIDEO_ID
            code = 1 if kind == "image" else 2
            (img_grids if kind == "image" else vid_grids).append((t, h, w))
            frames = [(1, h, w)] * t if (qwen3 and kind == "video") else [(t, h, w)]
            for (ft, fh, fw) in frames:
                n = ft * fh * fw // (merge * merge)
                ids += [92] + [tok] * n + [93]
                tt += [0] + [code] * n + [0]
            extra = torch.randint(1, 80, (2,), generator=g).tolist()
            ids += extra
            tt += [0] * len(extra)
        tail = torch.randint(1, 80, (4,), generator=g).tolist()
        ids += tail
        tt += [0] * len(tail)
        rows.append((ids, tt))
    input_ids, attention_mask = pad([r[0] for r in rows], pad_side)
    tt_pad, _ = pad([r[1] for r in rows], pad_side)
    out = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=tt_pad)
    if img_grids:
        n = sum(t * h * w for t, h, w in img_grids)
        out["pixel_values"] = torch.randn(n, per_patch, generator=g)
        out["image_grid_thw"] = torch.tensor(img_grids)
    if vid_grids:
        n = sum(t * h * w for t, h, w in vid_grids)
        out["pixel_values_videos"] = torch.randn(n, per_patch, generator=g)
        out["video_grid_thw"] = torch.tensor(vid_grids)
    return out


# ---------------------------------------------------------------- LLaVA-NeXT / OneVision
def tiny_llava_next(kind="llava_next", attn="sdpa", seed=0):
    import transformers as T

    torch.manual_seed(seed)
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=16, patch_size=4, projection_dim=32)
    text = T.LlamaConfig(**TEXT, pad_token_id=PAD_ID) if kind == "llava_next" else T.Qwen2Config(**TEXT, pad_token_id=PAD_ID)
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    common = dict(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, image_grid_pinpoints=pinpoints,
                  vision_feature_layer=-2)
    if kind == "llava_next":
        cfg = T.LlavaNextConfig(vision_feature_select_strategy="default", **common)
        cls = T.LlavaNextForConditionalGeneration
    else:
        cfg = T.LlavaOnevisionConfig(vision_feature_select_strategy="default", video_token_id=VIDEO_ID,
                                     vision_aspect_ratio="anyres_max_9", **common)
        cls = T.LlavaOnevisionForConditionalGeneration
    cfg.text_config.tie_word_embeddings = False
    model = cls(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def llava_next_inputs(model, image_sizes_per_sample, pad_side="left", seed=0):
    """image_sizes_per_sample: list (per sample) of lists of (height, width) original sizes."""
    import importlib

    module = importlib.import_module(type(model).__module__)
    image_size_to_num_patches = module.image_size_to_num_patches
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = cfg.vision_config.image_size
    flat = [hw for s in image_sizes_per_sample for hw in s]
    rows, pix, sizes = [], [], []
    lengths = []
    if flat:
        max_p = max(image_size_to_num_patches(hw, cfg.image_grid_pinpoints, size) for hw in flat)
        for hw in flat:
            p = torch.randn(max_p, 3, size, size, generator=g)
            pix.append(p)
            sizes.append(list(hw))
        pixel_values = torch.stack(pix)
        image_sizes = torch.tensor(sizes)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                                   vision_feature_layer=cfg.vision_feature_layer,
                                                   vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        lengths = [int(f.shape[0]) for f in feats.pooler_output]
    it = iter(lengths)
    for s in image_sizes_per_sample:
        ids = torch.randint(1, 80, (3,), generator=g).tolist()
        for _ in s:
            ids += [IMAGE_ID] * next(it) + torch.randint(1, 80, (2,), generator=g).tolist()
        ids += torch.randint(1, 80, (3,), generator=g).tolist()
        rows.append(ids)
    input_ids, attention_mask = pad(rows, pad_side)
    out = dict(input_ids=input_ids, attention_mask=attention_mask)
    if flat:
        out["pixel_values"], out["image_sizes"] = pixel_values, image_sizes
    return out


def llm_inputs_at(model, inputs, token_id=VIDEO_ID):
    """The hidden states entering the first decoder layer at sample 0's ``token_id`` tokens, from
    one unpatched forward (the features a layer-0 stage scores)."""
    got = {}

    def grab(module, args, kwargs):
        got.setdefault("h", (args[0] if args else kwargs["hidden_states"]).detach().clone())

    hook = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return got["h"][0][inputs["input_ids"][0] == token_id]


def onevision_video_inputs(model, frames_per_sample, pad_side="left", seed=0):
    """LLaVA-OneVision prompts with one video each (``frames_per_sample``: frames per sample, 0 =
    text only): every frame becomes a pooled ``side x side`` grid (half the patch grid, rounded
    up) and one newline token ends the video, so a video of f frames takes f * side**2 + 1
    placeholders."""
    import math

    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    side = math.ceil(vc.image_size // vc.patch_size / 2)
    rows = []
    for f in frames_per_sample:
        ids = torch.randint(1, 80, (3,), generator=g).tolist()
        if f:
            ids += [VIDEO_ID] * (f * side * side + 1) + torch.randint(1, 80, (2,), generator=g).tolist()
        ids += torch.randint(1, 80, (4,), generator=g).tolist()
        rows.append(ids)
    input_ids, attention_mask = pad(rows, pad_side)
    out = dict(input_ids=input_ids, attention_mask=attention_mask)
    frames = [f for f in frames_per_sample if f]
    if frames:
        assert len(set(frames)) == 1, "one frame count per batch (pixel_values_videos is one tensor)"
        out["pixel_values_videos"] = torch.randn(len(frames), frames[0], 3, vc.image_size, vc.image_size, generator=g)
    return out


def learned_options(method, model, seed=0, exits=True):
    """``{"weights": module}`` for a learned method (gtc, dyvte) on a tiny random model: an untrained
    network shaped for ``model`` (seeded); ``exits=False`` gives a DyVTE router that never exits
    (its gates output equal logits). ``{}`` for any other method."""
    from vtoken.adapters import get_adapter
    from vtoken.scorers.learned import DyVTERouter, GTCMapper

    cfg = get_adapter(model).text_config
    if method not in ("gtc", "dyvte"):
        return {}
    previous = torch.get_default_dtype()
    # modules draw their init from the global generator (left as it was) in the default dtype (float32 here)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            if method == "gtc":
                return {"weights": GTCMapper(cfg.num_attention_heads).eval()}
            router = DyVTERouter(cfg.hidden_size, cfg.num_hidden_layers, hidden=16).eval()
        finally:
            torch.set_default_dtype(previous)
        if not exits:
            for gate in router.gates:
                torch.nn.init.zeros_(gate[2].weight)
        return {"weights": router}
