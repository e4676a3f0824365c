"""The video checkpoint's pieces: torchvision-free video processing (Qwen2-VL's patch layout),
the training pipeline against the processor, packed video turns, vtoken.zoo.answer on videos,
the built-in name, and a CPU smoke run of ``python -m vtoken.zoo.train --data video``."""

import json
import os

import numpy as np
import pytest
import torch

from vtoken.data import synthetic, synthetic_video as sv
from vtoken.zoo import build


@pytest.fixture(scope="module")
def proc():
    return build.build_processor("qwen2vl")


def test_video_patch_layout_by_hand(proc):
    """pixel_values_videos row of (pair t, merge window (bh, bw), position (mh, mw) inside it) is
    [channel][frame in pair][y][x] of that 7 x 7 patch, normalised (Qwen2-VL's layout)."""
    from vtoken.zoo.processing import video_inputs

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(4, 28, 56, 3), dtype=np.uint8)  # 2 pairs, 4 x 8 patches of 7 px
    ip = proc.image_processor
    out = video_inputs([frames], ip.image_mean, ip.image_std, ip.rescale_factor, 7, 2, 2, 28 * 28, 10**6)
    assert out["video_grid_thw"].tolist() == [[2, 4, 8]]
    px = out["pixel_values_videos"]
    assert px.shape == (2 * 4 * 8, 3 * 2 * 7 * 7)
    mean, std = np.array(ip.image_mean), np.array(ip.image_std)
    norm = (frames / 255.0 - mean) / std  # (T, H, W, C)
    for t, bh, bw, mh, mw in [(0, 0, 0, 0, 0), (1, 1, 3, 1, 0), (0, 1, 2, 0, 1), (1, 0, 1, 1, 1)]:
        row = t * 32 + (bh * 4 + bw) * 4 + mh * 2 + mw  # 4 merge windows per row of 8 patches
        y, x = (bh * 2 + mh) * 7, (bw * 2 + mw) * 7
        ref = norm[2 * t : 2 * t + 2, y : y + 7, x : x + 7, :].transpose(3, 0, 1, 2).reshape(-1)
        np.testing.assert_allclose(px[row].numpy(), ref, atol=1e-5)


def test_odd_frame_count_repeats_the_last_frame(proc):
    from vtoken.zoo.processing import video_inputs

    ip = proc.image_processor
    frames = np.random.default_rng(1).integers(0, 256, size=(3, 28, 28, 3), dtype=np.uint8)
    a = video_inputs([frames], ip.image_mean, ip.image_std, ip.rescale_factor, 7, 2, 2, 28 * 28, 10**6)
    b = video_inputs([np.concatenate([frames, frames[-1:]])], ip.image_mean, ip.image_std, ip.rescale_factor,
                     7, 2, 2, 28 * 28, 10**6)
    assert torch.equal(a["pixel_values_videos"], b["pixel_values_videos"])


def test_training_video_pipeline_matches_the_processor(proc):
    from vtoken.zoo.train_checks import check_video_pipeline

    assert check_video_pipeline(proc) <= 1e-5


def test_packed_video_turns_equal_single_turns(proc):
    from vtoken.zoo.train_checks import check_packed_turns

    assert check_packed_turns("qwen2vl", proc, video=True) <= 1e-4


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    from vtoken.zoo.processing import save_processor

    d = tmp_path_factory.mktemp("qwen-video")
    tok = build.build_tokenizer()
    build.build_model("qwen2vl", tok).to(torch.float16).save_pretrained(d)
    save_processor(build.build_processor("qwen2vl", tok), str(d))
    (d / "TRAINING.md").write_text("random weights (test)\n")
    return str(d)


def test_answer_on_videos_batch_equals_one_by_one_and_mixes_with_images(random_ckpt):
    from vtoken import zoo

    model, p = zoo.load(random_ckpt)
    assert p.video_pixels[0] == build.QWEN_VIDEO_MIN_PIXELS  # saved and reloaded
    recs = sv.make_split("test", 3)
    img = synthetic.make_split("test", 1)[0]
    vids, qs = [r["video"] for r in recs], [r["question"] for r in recs]
    batch = zoo.answer(model, p, vids, qs, max_new_tokens=2)
    alone = [zoo.answer(model, p, [v], [q], max_new_tokens=2)[0] for v, q in zip(vids, qs)]
    assert batch == alone
    mixed = zoo.answer(model, p, [vids[0], img["image"], vids[1]], [qs[0], img["question"], qs[1]],
                       max_new_tokens=2)
    assert mixed == [alone[0], zoo.answer(model, p, [img["image"]], [img["question"]], max_new_tokens=2)[0], alone[1]]


def test_builtin_video_name_says_how_to_train_when_missing():
    from vtoken import zoo

    assert "vtoken/tiny-qwen2vl-video" in zoo.BUILTIN
    if "vtoken/tiny-qwen2vl-video" in zoo.available():
        assert zoo.resolve("tiny-qwen2vl-video").endswith("tiny-qwen2vl-video")
    else:
        with pytest.raises(FileNotFoundError, match="train_video.sh"):
            zoo.resolve("vtoken/tiny-qwen2vl-video")


def test_data_video_needs_qwen2vl():
    from vtoken.zoo.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--arch", "llava", "--data", "video", "--out", "x"])
    with pytest.raises(SystemExit):
        parse_args(["--arch", "qwen2vl", "--data", "video", "--out", "x", "--video-qtype-mix", "shape=1"])


def test_train_video_smoke_writes_a_loadable_checkpoint(tmp_path):
    """A few CPU steps of the video recipe, end to end (about 20 s)."""
    from vtoken import zoo
    from vtoken.zoo import train

    out = tmp_path / "tiny-qwen2vl-video"
    train.main(["--arch", "qwen2vl", "--data", "video", "--out", str(out), "--steps", "2", "--batch-size", "2",
                "--qa-per-image", "2", "--workers", "0", "--eval-workers", "0", "--val-n", "4", "--val-aux-n", "0",
                "--log-every", "100", "--test-n", "2", "--detail-test-n", "2", "--video-test-n", "4", "--subset-n", "2",
                "--easy-vqa-frac", "0", "--easy-test-n", "2", "--warmup", "1", "--device", "cpu"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"] == "video" and m["steps"] == 2 and m["visual_tokens_per_video"] == 256
    ft = m["synthetic_video_unpruned_first_token"]
    assert ft["n"] == 4 and set(ft["per_qtype"]) == set(sv.QTYPES)
    rk = m["synthetic_video_random_keep"]
    assert rk["keep"] == 0.111 and rk["drop_points"] == pytest.approx(ft["accuracy"] - rk["accuracy"], abs=0.01)
    assert m["video_pipeline_max_diff"] <= 1e-5
    assert m["cpu_video_subset"]["n"] == 40 and 0 <= m["cpu_video_subset"]["accuracy_device"] <= 100
    assert "val_video_acc" in m["log"][-1]
    assert "Video:" in (out / "TRAINING.md").read_text()
    assert os.path.getsize(out / "model.safetensors") < 16 * 2**20
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    model, p = zoo.load(str(out))
    r = sv.make_split("test", 1)[0]
    assert len(zoo.answer(model, p, [r["video"]], [r["question"]], max_new_tokens=2)) == 1
