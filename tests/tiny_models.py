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
