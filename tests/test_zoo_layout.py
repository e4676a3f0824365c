"""The LLaVA checkpoint layout both transformers 5 and vLLM load (vtoken/zoo/layout.py)."""

import json
import os

import torch
from safetensors import safe_open

from vtoken import zoo
from vtoken.zoo.layout import portable_llava_layout, portable_names


def _names(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_shipped_tiny_llava_is_in_the_portable_layout():
    """vLLM's LlavaForConditionalGeneration reads the CLIP tower under ``vision_tower.vision_model``."""
    names = _names(zoo.resolve("vtoken/tiny-llava"))
    assert "vision_tower.vision_model.embeddings.class_embedding" in names
    assert not any(n.startswith("vision_tower.") and not n.startswith("vision_tower.vision_model.") for n in names)
    assert portable_names(names) == {}


def test_rewrite_renames_only_the_tower_and_reloads_identically(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2)
    cfg = T.LlavaConfig(vision_config=T.CLIPVisionConfig(**vision), text_config=T.LlamaConfig(**text),
                        image_token_index=3, image_seq_length=4)
    model = T.LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path)
    before = _names(tmp_path)
    renamed = portable_names(before)
    assert renamed and all(k.startswith("vision_tower.") for k in renamed)
    assert portable_llava_layout(str(tmp_path)) == len(renamed)
    after = _names(tmp_path)
    assert sorted(after) == sorted(renamed.get(k, k) for k in before)
    assert portable_llava_layout(str(tmp_path)) == 0  # idempotent
    again = T.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = torch.tensor([[1, 3, 3, 3, 3, 5, 6]])
    pix = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pix).logits, again(input_ids=ids, pixel_values=pix).logits)


def test_rewrite_leaves_other_models_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert portable_llava_layout(str(tmp_path)) == 0
