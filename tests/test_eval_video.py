"""``vtoken eval --data synthetic-video``: the loader, the default model and methods for video data,
and an end-to-end run on a random-weight tiny Qwen2-VL checkpoint."""

import json

import pytest
import torch

from vtoken.data import synthetic_video as sv
from vtoken.eval import cli
from vtoken.eval.config import VIDEO_METHODS, VIDEO_MODEL
from vtoken.eval.loaders import load_dataset, parse_data_spec


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    from vtoken.zoo import build
    from vtoken.zoo.processing import save_processor

    d = tmp_path_factory.mktemp("qwen-video-eval")
    tok = build.build_tokenizer()
    build.build_model("qwen2vl", tok, seed=1).to(torch.float16).save_pretrained(d)
    save_processor(build.build_processor("qwen2vl", tok), str(d))
    (d / "TRAINING.md").write_text("random weights (test)\n")
    return str(d)


def test_loader_gives_clips_as_frame_lists():
    assert parse_data_spec("synthetic-video").kind == "synthetic-video"
    assert parse_data_spec("synthetic_video?seed=2").options == {"seed": "2"}
    ds = load_dataset("synthetic-video", limit=8)
    assert ds.name == "SyntheticVideo" and ds.metric == "exact" and len(ds.samples) == 8
    ref = sv.make_split("test", 8, seed=0)
    for s, r in zip(ds.samples, ref):
        assert isinstance(s.image, list) and len(s.image) == sv.FRAMES
        assert (s.question, s.answers[0], s.qtype) == (r["question"], r["answer"], r["qtype"])
    from vtoken.eval.files import open_image

    frames = open_image(ds.samples[0].image)
    assert len(frames) == sv.FRAMES and frames[0].mode == "RGB"


def test_video_data_defaults_to_the_video_checkpoint_and_methods(random_ckpt):
    args = cli.build_parser().parse_args(["--data", "synthetic-video"])
    from vtoken import zoo

    if VIDEO_MODEL in zoo.available():
        assert cli.config_from_args(args).model == VIDEO_MODEL
    else:
        with pytest.raises(SystemExit, match="train_video.sh"):
            cli.config_from_args(args)
    cfg = cli.config_from_args(cli.build_parser().parse_args(["--data", "synthetic-video", "--model", random_ckpt]))
    import vtoken

    assert cfg.methods == [m for m in VIDEO_METHODS if m in vtoken.available_methods()]
    assert {"dycoke", "fastvid", "holitom"} <= set(cfg.methods)
    image_cfg = cli.config_from_args(cli.build_parser().parse_args(["--data", "synthetic"]))
    assert image_cfg.model == "vtoken/tiny-llava" and "dycoke" not in image_cfg.methods


@pytest.mark.slow
def test_eval_runs_video_methods_and_writes_a_table(random_ckpt, tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["--model", random_ckpt, "--data", "synthetic-video", "--limit", "4", "--batch-size", "4",
                   "--keep", "0.25", "--methods", "fastv,dycoke,fastvid,random", "--out", str(out),
                   "--no-progress", "--max-new-tokens", "2"])
    assert rc == 0
    table = (out / "table.md").read_text()
    assert "SyntheticVideo" in table and "256 tokens" in table
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["method"] for p in preds} == {"none", "fastv", "dycoke", "fastvid", "random"}
    assert len(preds) == 5 * 4
    for p in preds:
        assert p.get("error") in (None, "")
        if p["method"] == "random":
            assert p["kept_tokens"] == 64  # 25 % of a clip's 256 visual tokens


def test_hf_answer_takes_videos_through_the_chat_path(random_ckpt):
    """A model answered through hf_answer (not the zoo's prompt): a video item goes to the lmms
    plugin's chat path; a batch answers as each question alone."""
    from vtoken import zoo
    from vtoken.eval.backend import hf_answer

    model, p = zoo.load(random_ckpt)
    recs = sv.make_split("test", 2)
    vids, qs = [r["video"] for r in recs], [r["question"] for r in recs]
    batch = hf_answer(model, p, vids, qs, max_new_tokens=2)
    assert batch == [hf_answer(model, p, [v], [q], max_new_tokens=2)[0] for v, q in zip(vids, qs)]


def test_lmms_zoo_answer_takes_one_video_on_qwen2vl(random_ckpt):
    """The lmms plugin's built-in-checkpoint path answers a video (frames) as vtoken.zoo.answer does."""
    from vtoken import zoo
    from vtoken.lmms.answer import GenerationSettings, answer_function

    model, p = zoo.load(random_ckpt)
    r = sv.make_split("test", 1)[0]
    fn = answer_function("vtoken.zoo", GenerationSettings(2))
    got = fn(model, p, [[r["video"]]], [r["question"]], max_new_tokens=2)
    assert got == zoo.answer(model, p, [r["video"]], [r["question"]], max_new_tokens=2)
