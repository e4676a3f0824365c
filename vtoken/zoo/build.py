"""Build the reference checkpoints' pieces from scratch: tokenizer, processor, model config.

Everything here is local: the tokenizer is a word-level ``tokenizers`` model over the closed
vocabulary of :mod:`vtoken.data.synthetic` and ``easy-vqa``; the processors use the PIL image
backends (no torchvision needed), and the models are ``transformers`` classes with random weights.

Sizes (both checkpoints share the language-model shape):

* language model: Llama/Qwen2 decoder, hidden 256, 6 layers, 8 query heads and 4 key-value
  heads of dim 32 (GQA), MLP 768; rotary base 1e6 for LLaVA's 1-D RoPE, 1e4 for Qwen2-VL's M-RoPE.
* LLaVA vision tower: CLIP ViT, 336 px, patch 14 (24 x 24 = 576 patches + [CLS]), hidden 128,
  4 layers (features of the penultimate one, as LLaVA-1.5), [CLS] dropped ("default").
* Qwen2-VL vision tower: hidden 128, 3 layers, patch 7, temporal patch 2, 2 x 2 merge, so one
  visual token covers 14 x 14 pixels as in LLaVA-1.5. Dynamic resolution: the processor keeps
  images between 336 x 336 and 672 x 672 pixels (sides rounded to multiples of 14); the default
  336 px synthetic image gives 48 x 48 patches -> 24 x 24 = 576 visual tokens, a 448 x 448 image
  gives 1024 and a 336 x 504 one 864. (Qwen2-VL itself uses patch 14 at ~2x the resolution; patch
  7 keeps these tiny checkpoints' tokens aligned with the synthetic scenes' 14 px lattice.)
"""

from __future__ import annotations

from vtoken.data import synthetic, synthetic_video

ARCHS = ("llava", "qwen2vl")

# Special tokens. The Qwen ones keep Qwen2-VL's own spellings so its processor finds them.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
LLAVA_IMAGE = "<image>"
QWEN_VISION_START, QWEN_VISION_END = "<|vision_start|>", "<|vision_end|>"
QWEN_IMAGE_PAD, QWEN_VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, LLAVA_IMAGE, QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE_PAD, QWEN_VIDEO_PAD)

# easy-vqa's question words (its whole vocabulary, checked against the package's questions).
EASY_VQA_WORDS = (
    "?", "a", "black", "blue", "brown", "circle", "color", "contain", "does", "gray", "green", "image",
    "in", "is", "no", "not", "of", "present", "rectangle", "red", "shape", "teal", "the", "there",
    "triangle", "what", "yellow",
)
PROMPT_WORDS = ("user", "assistant", ":")

QWEN_PATCH = 7
LLAVA_ROPE_THETA = 1e6
QWEN_MIN_PIXELS = 336 * 336
QWEN_MAX_PIXELS = 672 * 672
# video frames may be smaller than images: the synthetic clips' 112 px frames stay 112 px, so a clip
# of 8 frames is 4 x 8 x 8 = 256 visual tokens (vtoken.data.synthetic_video)
QWEN_VIDEO_MIN_PIXELS = 112 * 112


def vocabulary() -> list[str]:
    """Special tokens first, then every word, in a fixed order."""
    words: list[str] = []
    for w in (
        *PROMPT_WORDS,
        *synthetic.QUESTION_WORDS,
        *synthetic.ANSWER_VOCAB,
        *EASY_VQA_WORDS,
        # a few extra digits/words so counting answers and near-vocabulary questions never hit <unk>
        "10", "and", "right", "below", "how", "many", "objects",
        *synthetic.AUX_WORDS,  # training-only position questions (last: earlier ids unchanged)
        *synthetic_video.WORDS,  # the video set's words not already there (appended: ids unchanged)
    ):
        if w not in words:
            words.append(w)
    return list(SPECIAL_TOKENS) + words


def image_placeholder(arch: str) -> str:
    """The text that stands for one image in a prompt of ``arch`` (before processor expansion)."""
    if arch == "llava":
        return LLAVA_IMAGE
    if arch == "qwen2vl":
        return QWEN_VISION_START + QWEN_IMAGE_PAD + QWEN_VISION_END
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def video_placeholder(arch: str) -> str:
    """The text that stands for one video in a prompt of ``arch`` (Qwen2-VL only)."""
    if arch == "qwen2vl":
        return QWEN_VISION_START + QWEN_VIDEO_PAD + QWEN_VISION_END
    raise ValueError(f"only the qwen2vl checkpoints take videos, got arch {arch!r}")


def prompt(arch: str, question: str, video: bool = False) -> str:
    """The exact training prompt; the model answers with one word and then EOS."""
    visual = video_placeholder(arch) if video else image_placeholder(arch)
    return f"USER: {visual}\n{question} ASSISTANT:"


def build_tokenizer():
    """A word-level fast tokenizer (lower-cased, punctuation split, BOS prepended)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    return fast


def build_processor(arch: str, tokenizer=None):
    """The processor saved beside a checkpoint (PIL image backend: works without torchvision)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    if arch == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        ip = CLIPImageProcessorPil(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            do_center_crop=True,
            do_convert_rgb=True,
        )
        return LlavaProcessor(
            image_processor=ip,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            image_token=LLAVA_IMAGE,
        )
    if arch == "qwen2vl":
        from transformers import Qwen2VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        ip = Qwen2VLImageProcessorPil(
            min_pixels=QWEN_MIN_PIXELS,
            max_pixels=QWEN_MAX_PIXELS,
            patch_size=QWEN_PATCH,
            temporal_patch_size=2,
            merge_size=2,
        )
        from vtoken.zoo.processing import Qwen2VLImageOnlyProcessor, torchvision_available

        if torchvision_available():  # the stock processor, video processor included
            try:
                from transformers import Qwen2VLVideoProcessor

                vp = Qwen2VLVideoProcessor(
                    min_pixels=QWEN_VIDEO_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, patch_size=QWEN_PATCH, merge_size=2
                )
                return Qwen2VLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp)
            except Exception:  # pragma: no cover - a torchvision that does not import
                pass
        return Qwen2VLImageOnlyProcessor(image_processor=ip, tokenizer=tokenizer,
                                         video_pixels=(QWEN_VIDEO_MIN_PIXELS, QWEN_MAX_PIXELS))
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def _text_kwargs(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_config(arch: str, tokenizer=None):
    """The model config of ``arch`` (see the module docstring for sizes)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    text = _text_kwargs(tokenizer)
    if arch == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
            num_channels=3,
            hidden_act="quick_gelu",
        )
        # rope_theta 1e6 (as Llama 3 / Qwen2 use): with head dim 32 and the question ~600 tokens
        # after the image's first patch, theta 1e4 leaves only 4 of 16 rotary frequencies slow
        # enough for a content lookup ("the red object") that works wherever the object is; 1e6
        # leaves 8. (Qwen2-VL's M-RoPE keeps text-to-image distances under ~40, so 1e4 is fine.)
        text_cfg = LlamaConfig(**text, rope_parameters={"rope_type": "default", "rope_theta": LLAVA_ROPE_THETA})
        cfg = LlavaConfig(
            vision_config=vision,
            text_config=text_cfg,
            image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE),
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            image_seq_length=576,
            tie_word_embeddings=False,
        )
    elif arch == "qwen2vl":
        from transformers import Qwen2VLConfig

        text_cfg = dict(
            text,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        )
        vision = dict(
            depth=3,
            embed_dim=128,
            hidden_size=text["hidden_size"],
            num_heads=4,
            mlp_ratio=4,
            patch_size=QWEN_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            hidden_act="quick_gelu",
        )
        cfg = Qwen2VLConfig(
            text_config=text_cfg,
            vision_config=vision,
            image_token_id=tokenizer.convert_tokens_to_ids(QWEN_IMAGE_PAD),
            video_token_id=tokenizer.convert_tokens_to_ids(QWEN_VIDEO_PAD),
            vision_start_token_id=tokenizer.convert_tokens_to_ids(QWEN_VISION_START),
            vision_end_token_id=tokenizer.convert_tokens_to_ids(QWEN_VISION_END),
            tie_word_embeddings=False,
        )
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    cfg.bos_token_id = tokenizer.bos_token_id
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    return cfg


def set_mrope_section(model, section) -> None:
    """Give a Qwen2-VL ``model`` another M-RoPE split (``(t, h, w)`` rotary frequency counts, summing
    to half the head dim), in its config and its rotary embedding. Text tokens have t = h = w, so
    their rotation does not change; image tokens' h / w positions drive other frequencies (the
    highest go to t, the lowest to w: with the default [4, 6, 6] and theta 1e4, w rotates by at
    most 0.003 rad per position, too little for the language model to tell columns apart)."""
    section = [int(x) for x in section]
    text_cfg = model.config.get_text_config()
    half = (getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads) // 2
    if len(section) != 3 or sum(section) != half or min(section) < 1:
        raise ValueError(f"mrope_section must be three positive ints summing to {half}, got {section}")
    text_cfg.rope_parameters["mrope_section"] = section
    hits = 0
    for module in model.modules():
        if hasattr(module, "mrope_section") and hasattr(module, "inv_freq"):
            module.mrope_section = list(section)
            hits += 1
    if not hits:
        raise ValueError(f"{type(model).__name__} has no M-RoPE rotary embedding")


def build_model(arch: str, tokenizer=None, seed: int = 0):
    """A randomly initialised model of ``arch`` (SDPA attention)."""
    import torch

    cfg = build_config(arch, tokenizer)
    torch.manual_seed(seed)
    if arch == "llava":
        from transformers import LlavaForConditionalGeneration as cls
    else:
        from transformers import Qwen2VLForConditionalGeneration as cls
    cfg._attn_implementation = "sdpa"
    model = cls(cfg)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id
    gc.do_sample = False
    gc.max_new_tokens = 4
    return model
