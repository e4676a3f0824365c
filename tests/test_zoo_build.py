"""Building blocks of the reference checkpoints: tokenizer, processors, training pipeline."""

import json
import os

import pytest
import torch

from vtoken.data import synthetic
from vtoken.zoo import build


def test_tokenizer_is_word_level_over_the_closed_vocabulary():
    tok = build.build_tokenizer()
    for w in synthetic.ANSWER_VOCAB:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, w
    ids = tok("What COLOR is the triangle?")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(tok("how many circles are there?", add_special_tokens=False)["input_ids"]) == (
        "how many circles are there ?"
    )
    for r in synthetic.make_split("test", 40):
        assert tok.unk_token_id not in tok(r["question"])["input_ids"]


@pytest.mark.parametrize("arch", build.ARCHS)
def test_prompt_has_the_architecture_placeholder(arch):
    p = build.prompt(arch, "how many objects are there?")
    assert p.startswith("USER: ") and p.endswith("how many objects are there? ASSISTANT:")
    assert build.image_placeholder(arch) in p


@pytest.mark.parametrize("arch", build.ARCHS)
def test_training_pipeline_matches_the_processor(arch):
    from vtoken.zoo.train import check_pipeline

    proc = build.build_processor(arch)
    assert check_pipeline(arch, proc, n=2) < 1e-5


@pytest.mark.parametrize("arch", build.ARCHS)
def test_packed_training_turns_equal_single_turns(arch):
    """Independent turns packed behind one image (4-D mask, explicit positions / M-RoPE template)
    give the logits of each turn run alone through the model's default path."""
    from vtoken.zoo.train import check_packed_turns

    assert check_packed_turns(arch, build.build_processor(arch), n_images=1, turns=2) < 1e-4


def test_qwen_processor_roundtrip_without_torchvision(tmp_path):
    from vtoken.zoo.processing import load_processor, save_processor

    proc = build.build_processor("qwen2vl")
    save_processor(proc, str(tmp_path))
    with open(tmp_path / "processor_config.json") as fh:
        assert json.load(fh)["processor_class"] == "Qwen2VLProcessor"
    back = load_processor(str(tmp_path))
    assert type(back.image_processor).__name__.endswith("Pil")
    recs = synthetic.make_split("test", 2)
    out = back(
        images=[r["image"] for r in recs],
        text=[build.prompt("qwen2vl", r["question"]) for r in recs],
        return_tensors="pt",
        padding=True,
    )
    assert out["image_grid_thw"].tolist() == [[1, 48, 48]] * 2  # 336 px, patch 7 -> 24 x 24 tokens
    image_id = back.tokenizer.convert_tokens_to_ids(build.QWEN_IMAGE_PAD)
    assert (out["input_ids"] == image_id).sum(1).tolist() == [576, 576]
    assert back.tokenizer.padding_side == "left"


@pytest.mark.parametrize("arch,n_visual", [("llava", 576), ("qwen2vl", 576)])
def test_random_models_have_the_promised_shapes(arch, n_visual):
    cfg = build.build_config(arch)
    if arch == "llava":
        v = cfg.vision_config
        assert (v.image_size // v.patch_size) ** 2 == n_visual
        assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    else:
        assert cfg.vision_config.spatial_merge_size == 2
        p = cfg.vision_config.patch_size
        assert (build.QWEN_MIN_PIXELS // (p * p)) // 4 == n_visual
    model = build.build_model(arch)
    n = sum(p.numel() for p in model.parameters())
    assert n * 2 < 15e6  # float16 checkpoint under 15 MB


def test_set_mrope_section_moves_image_rotations_and_keeps_text_ones():
    import torch

    from vtoken.zoo import build

    model = build.build_model("qwen2vl", seed=0).eval()
    rot = model.model.language_model.rotary_emb
    x = torch.zeros(1, 1, 4)
    text_pos = torch.arange(5).view(1, 1, 5).expand(3, 1, 5)  # t = h = w
    img_pos = torch.stack([torch.zeros(5), torch.zeros(5), torch.arange(5.0)]).view(3, 1, 5).long()  # w moves
    before_text, before_img = rot(x, text_pos)[0], rot(x, img_pos)[0]
    build.set_mrope_section(model, [2, 2, 12])
    assert model.config.get_text_config().rope_parameters["mrope_section"] == [2, 2, 12]
    after_text, after_img = rot(x, text_pos)[0], rot(x, img_pos)[0]
    assert torch.equal(before_text, after_text)
    # column 4 vs column 0: the largest rotation angle moved by w grows (by hand: index 4 of 16, theta 1e4)
    angle = lambda c: torch.acos(c[0, 4].clamp(-1, 1)).max()  # noqa: E731
    assert angle(before_img) < 0.02 < 0.3 < angle(after_img)
    with pytest.raises(ValueError, match="summing to 16"):
        build.set_mrope_section(model, [4, 4, 4])
