"""Architectures and synthetic inputs for ``vtoken bench``.

Full size: LLaVA-1.5-7B, LLaVA-NeXT-7B (llava-v1.6-vicuna-7b) and Qwen2.5-VL-7B, from the public
config values of those checkpoints, random weights built directly on the device in bf16 (speed
does not depend on weight values; no checkpoint can be downloaded here), SDPA attention.
Tiny (``--tiny``): the same classes with small sizes, fp32, for the CPU.

LLaVA-NeXT-vicuna-7B uses exactly LLaVA-1.5-7B's language model (Vicuna-7B), vision tower
(CLIP ViT-L/14 at 336 px, features of the penultimate layer) and projector shapes, so when both
are wanted :class:`ModelPool` builds LLaVA-NeXT once and makes LLaVA-1.5 a second top-level
model that *shares* those modules (only LLaVA-NeXT's ``image_newline`` vector is its own).

Inputs are built without a processor: token ids with the right number of placeholder tokens,
random pixel tensors of the right shapes, and the grid metadata.
"""

from __future__ import annotations


import torch

IMAGE_TOKEN = 32000  # LLaVA-1.5 / LLaVA-NeXT (vicuna) image placeholder id (vocab 32064)
QWEN_IMAGE, QWEN_VSTART, QWEN_VEND = 151655, 151652, 151653

# ---------------------------------------------------------------- public config values
CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
VICUNA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 pad_token_id=0)
# llava-v1.6 anyres grid: 336 px crops in 1x2, 2x1, 2x2, 3x1, 1x3 layouts
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
QWEN25_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, num_heads=16,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], in_channels=3)

# ---------------------------------------------------------------- tiny stand-ins (same classes)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=24, patch_size=4, projection_dim=32, hidden_act="quick_gelu")  # 6x6 = 36 tokens/crop
TINY_VICUNA = dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
                   pad_token_id=0)
TINY_PINPOINTS = [[24, 48], [48, 24], [48, 48], [72, 24], [24, 72]]
TINY_QWEN_TEXT = dict(vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
TINY_QWEN_VISION = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2,
                        temporal_patch_size=2, spatial_merge_size=2, window_size=8, fullatt_block_indexes=[1],
                        in_channels=3)


def _build(cls, cfg, device, dtype):
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype)
    return model.eval()


def _llava_text_vision(tiny):
    from transformers import CLIPVisionConfig, LlamaConfig

    return LlamaConfig(**(TINY_VICUNA if tiny else VICUNA_7B)), CLIPVisionConfig(**(TINY_CLIP if tiny else CLIP_L14_336))


def llava_config(tiny: bool):
    from transformers import LlavaConfig

    text, vision = _llava_text_vision(tiny)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)


def llava_next_config(tiny: bool):
    from transformers import LlavaNextConfig

    text, vision = _llava_text_vision(tiny)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                           image_grid_pinpoints=TINY_PINPOINTS if tiny else LLAVA_NEXT_PINPOINTS,
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           projector_hidden_act="gelu", tie_word_embeddings=False, use_image_newline_parameter=True)


def qwen25_vl_config(tiny: bool):
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(text_config=dict(TINY_QWEN_TEXT if tiny else QWEN25_VL_7B_TEXT),
                           vision_config=dict(TINY_QWEN_VISION if tiny else QWEN25_VL_7B_VISION),
                           image_token_id=QWEN_IMAGE, video_token_id=151656, vision_start_token_id=QWEN_VSTART,
                           vision_end_token_id=QWEN_VEND)
    cfg.text_config.tie_word_embeddings = False
    return cfg


def build_llava(tiny, device, dtype):
    from transformers import LlavaForConditionalGeneration

    return _build(LlavaForConditionalGeneration, llava_config(tiny), device, dtype)


def build_llava_next(tiny, device, dtype):
    from transformers import LlavaNextForConditionalGeneration

    return _build(LlavaNextForConditionalGeneration, llava_next_config(tiny), device, dtype)


def llava_sharing(next_model, tiny, dtype):
    """A ``LlavaForConditionalGeneration`` (LLaVA-1.5) whose vision tower, projector, language
    model and head ARE ``next_model``'s (no copy; built on the meta device, then the modules are
    attached)."""
    from transformers import LlavaForConditionalGeneration

    cfg = llava_config(tiny)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    src = next_model.model
    model.model.vision_tower = src.vision_tower
    model.model.multi_modal_projector = src.multi_modal_projector
    model.model.language_model = src.language_model
    model.lm_head = next_model.lm_head
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"LLaVA-1.5 sharing LLaVA-NeXT's modules still has meta tensors: {left[:5]}")
    model.generation_config = next_model.generation_config
    return model.eval()


def build_qwen25_vl(tiny, device, dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _build(Qwen2_5_VLForConditionalGeneration, qwen25_vl_config(tiny), device, dtype)


def set_attention(model, impl: str) -> None:
    """Switch every (sub)model of ``model`` to attention implementation ``impl``.

    Sets the configs directly instead of ``model.set_attn_implementation``: with modules shared
    between two top-level models (see :func:`llava_sharing`), transformers 5.17's
    ``set_attn_implementation`` leaves a private marker on the shared sub-configs and silently
    skips them on the next call.
    """
    seen = set()

    def visit(cfg):
        if cfg is None or id(cfg) in seen:
            return
        seen.add(id(cfg))
        cfg._attn_implementation_internal = impl
        if hasattr(cfg, "_attn_was_changed"):
            del cfg._attn_was_changed
        for key in getattr(cfg, "sub_configs", {}) or {}:
            visit(getattr(cfg, key, None))

    visit(model.config)
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            visit(cfg)


def attention_of(model) -> str:
    """The attention implementation the language model's layers will use."""
    return model.model.language_model.config._attn_implementation


class ModelPool:
    """Builds each architecture at most once per run and hands it to every suite that needs it.

    ``llava-1.5-7b`` shares LLaVA-NeXT's modules (see :func:`llava_sharing`) when LLaVA-NeXT is
    also wanted in this run; otherwise it is built on its own.
    """

    def __init__(self, bench, wanted: set):
        self.bench = bench
        self.wanted = set(wanted)
        self.models = {}
        self.build_s = {}

    def get(self, name):
        if name in self.models:
            return self.models[name]
        import time

        b = self.bench
        t0 = time.perf_counter()
        if name == "llava-next-7b":
            model = build_llava_next(b.tiny, b.device, b.dtype)
        elif name == "llava-1.5-7b":
            if "llava-next-7b" in self.wanted or "llava-next-7b" in self.models:
                model = llava_sharing(self.get("llava-next-7b"), b.tiny, b.dtype)
            else:
                model = build_llava(b.tiny, b.device, b.dtype)
        elif name == "qwen2.5-vl-7b":
            model = build_qwen25_vl(b.tiny, b.device, b.dtype)
        else:
            raise KeyError(f"unknown model {name!r}")
        b.sync()
        self.build_s[name] = round(time.perf_counter() - t0, 1)
        b.log(f"built {name} in {self.build_s[name]} s")
        self.models[name] = model
        return model

    def release(self, *names):
        dropped = [self.models.pop(n) for n in names if n in self.models]
        if dropped:
            del dropped
            self.bench.empty_cache(collect=True)

    def release_all_but(self, *keep):
        self.release(*[n for n in list(self.models) if n not in keep])


# ---------------------------------------------------------------- inputs
def _rand_ids(g, n):
    return torch.randint(100, 30000, (n,), generator=g).tolist()


def _pixels(shape, device, dtype, seed=0):
    """Random pixel tensor made on the device itself (a 400-image batch is 0.5 GB: no host copy)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


def llava_inputs(model, batch: int, n_images: int = 1, text_tokens: int = 64, device="cpu", dtype=torch.float32):
    """LLaVA-1.5 prompt per sample: BOS + 8 text tokens, then ``n_images`` x (576 image tokens +
    2 text tokens), then text up to ``text_tokens`` text tokens in all."""
    g = torch.Generator().manual_seed(0)
    vc = model.config.vision_config
    per = (vc.image_size // vc.patch_size) ** 2
    ids = [1] + _rand_ids(g, 8)
    for _ in range(n_images):
        ids += [IMAGE_TOKEN] * per + _rand_ids(g, 2)
    ids += _rand_ids(g, max(1, text_tokens - 9 - 2 * n_images))
    input_ids = torch.tensor([ids] * batch, device=device)
    pix = _pixels((batch * n_images, 3, vc.image_size, vc.image_size), device, dtype)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pix)


def llava_next_inputs(model, batch: int, image_hw=None, text_tokens: int = 64, device="cpu", dtype=torch.float32):
    """LLaVA-NeXT prompt per sample: one image of ``image_hw`` (default 672 x 672: the 2x2 anyres
    grid, 5 crops of 336 px: 576 base + 48x48 grid tokens + 48 image-newline tokens = 2928 image
    tokens). The token count is read from the model's own ``get_image_features``."""
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    size = cfg.vision_config.image_size
    if image_hw is None:
        image_hw = (2 * size, 2 * size)
    import importlib

    mod = importlib.import_module(type(model).__module__)
    n_crops = mod.image_size_to_num_patches(image_hw, cfg.image_grid_pinpoints, size)
    pix = _pixels((batch, n_crops, 3, size, size), device, dtype)
    sizes = torch.tensor([list(image_hw)] * batch, device=device)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pix[:1], image_sizes=sizes[:1],
                                             vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = getattr(out, "pooler_output", out)
    n_tok = int(feats[0].shape[0]) if isinstance(feats, (list, tuple)) else int(feats.shape[-2])
    ids = [1] + _rand_ids(g, 8) + [IMAGE_TOKEN] * n_tok + _rand_ids(g, text_tokens - 9)
    input_ids = torch.tensor([ids] * batch, device=device)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pix, image_sizes=sizes)


def qwen_image_grid(tiny: bool) -> tuple:
    """(t, h, w) patch grid of one benchmark image: 1792 x 1792 px = 128 x 128 patches of 14 px =
    4096 visual tokens after the 2x2 merge (tiny: 16 x 16 patches = 64 tokens)."""
    return (1, 16, 16) if tiny else (1, 128, 128)


def qwen_inputs(model, n_images: int, grid: tuple, text_tokens: int = 32, device="cpu", dtype=torch.float32):
    """Qwen2.5-VL prompt, batch 1: 3 text tokens, ``n_images`` x (<vision_start> image tokens
    <vision_end> + 2 text tokens), ``text_tokens`` text tokens."""
    g = torch.Generator().manual_seed(0)
    vc = model.config.vision_config
    t, h, w = grid
    per = t * h * w // (vc.spatial_merge_size ** 2)
    ids, tt = [151644] + _rand_ids(g, 2), [0, 0, 0]
    for _ in range(n_images):
        ids += [QWEN_VSTART] + [QWEN_IMAGE] * per + [QWEN_VEND] + _rand_ids(g, 2)
        tt += [0] + [1] * per + [0, 0, 0]
    ids += _rand_ids(g, text_tokens)
    tt += [0] * text_tokens
    input_ids = torch.tensor([ids], device=device)
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pix = _pixels((n_images * t * h * w, patch_dim), device, dtype)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pix,
                image_grid_thw=torch.tensor([list(grid)] * n_images, device=device),
                mm_token_type_ids=torch.tensor([tt], device=device))


QWEN_VIDEO = 151656  # Qwen2.5-VL video placeholder id (``video_token_id``)


def qwen_video_grid(model, frames: int, side: int, tiny: bool) -> tuple:
    """(t, h, w) patch grid of one benchmark video: ``frames`` frames of ``side`` x ``side`` px cut
    into patches of 14 px (the full-size tower's) and temporal groups of ``temporal_patch_size``
    frames: 16 frames of 448 px = 8 x 32 x 32 patches = 2048 visual tokens after the 2 x 2 merge.
    Tiny configs keep the temporal groups and take a quarter of the side in patches (448 px: 8 x 8
    patches, 128 tokens for 16 frames)."""
    vc = model.config.vision_config
    merge, tp, patch = vc.spatial_merge_size, vc.temporal_patch_size, QWEN25_VL_7B_VISION["patch_size"]
    if frames < tp or frames % tp:
        raise ValueError(f"--video-frames must be a positive multiple of the temporal patch size {tp}; got {frames}")
    if side < patch * merge or side % (patch * merge):
        raise ValueError(f"--video-side must be a positive multiple of {patch * merge} px (patch {patch} x merge "
                         f"{merge}); got {side}")
    h = side // patch
    if tiny:
        h = max(merge, h // 4 // merge * merge)
    return (frames // tp, h, h)


def qwen_video_inputs(model, batch: int, grid: tuple, text_tokens: int = 32, device="cpu", dtype=torch.float32):
    """Qwen2.5-VL prompt per sample: 3 text tokens, <vision_start> one video's tokens <vision_end>,
    ``text_tokens`` text tokens; ``batch`` samples, each with its own random video of patch grid
    ``grid`` (t, h, w) (``pixel_values_videos`` (batch * t * h * w, 3 * 2 * 14 * 14),
    ``video_grid_thw`` (batch, 3); no ``second_per_grid_ts``: transformers' default of 1 s per
    temporal group, the processor's at 2 fps)."""
    g = torch.Generator().manual_seed(0)
    vc = model.config.vision_config
    t, h, w = grid
    per = t * h * w // (vc.spatial_merge_size ** 2)
    video = getattr(model.config, "video_token_id", None) or QWEN_VIDEO
    head, tail = [151644] + _rand_ids(g, 2), _rand_ids(g, text_tokens)
    ids = head + [QWEN_VSTART] + [video] * per + [QWEN_VEND] + tail
    tt = [0] * (len(head) + 1) + [2] * per + [0] * (1 + len(tail))
    input_ids = torch.tensor([ids] * batch, device=device)
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pix = _pixels((batch * t * h * w, patch_dim), device, dtype)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values_videos=pix,
                video_grid_thw=torch.tensor([list(grid)] * batch, device=device),
                mm_token_type_ids=torch.tensor([tt] * batch, device=device))
