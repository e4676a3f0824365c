"""Malformed inputs and interruptions of ``vtoken eval`` (issue 15, item 9): every bad file stops
the run with a vtoken error naming the file and the line, and nothing already written changes."""

import functools
import json

import pytest
from PIL import Image

from vtoken.errors import DataError, DataFormatError, VTokenError
from vtoken.eval import cli
from vtoken.eval import loaders
from vtoken.eval import runner as runner_mod
from vtoken.eval.loaders import load_dataset
from vtoken.eval.runner import read_jsonl, run_eval

from test_eval_runner import FakeBackend, config, make_datasets


def png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def test_error_classes():
    assert issubclass(DataFormatError, DataError) and issubclass(DataError, VTokenError)
    assert issubclass(DataError, ValueError)
    assert loaders.DataError is DataError  # the name the loaders and the CLI always used


# --- loaders ----------------------------------------------------------------------------------


def _vqav2(root, questions=None, annotations=None, images=True):
    root.mkdir(parents=True, exist_ok=True)
    qs = {"questions": [{"question_id": 10, "image_id": 42, "question": "What color?"}]}
    anns = {"annotations": [{"question_id": 10, "answers": [{"answer": "red"}] * 10}]}
    q = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = root / "v2_mscoco_val2014_annotations.json"
    q.write_text(json.dumps(qs) if questions is None else questions)
    a.write_text(json.dumps(anns) if annotations is None else annotations)
    (root / "val2014").mkdir(exist_ok=True)
    if images:
        png(root / "val2014" / "COCO_val2014_000000000042.jpg")
    return q, a


def test_vqav2_questions_as_json_list(tmp_path):
    q, _ = _vqav2(tmp_path / "v", questions='\n[{"question_id": 10, "image_id": 42, "question": "x"}]')
    with pytest.raises(DataFormatError) as e:
        load_dataset(f"vqav2:{tmp_path / 'v'}")
    msg = str(e.value)
    assert str(q) in msg and "line 2" in msg and "got a JSON list (1 item)" in msg and '"questions"' in msg


def test_vqav2_annotations_as_json_list_and_missing_key(tmp_path):
    _, a = _vqav2(tmp_path / "v", annotations="[]")
    with pytest.raises(DataFormatError, match=r"annotations file .*v2_mscoco_val2014_annotations.json, line 1: .*"
                                              r"got a JSON list \(0 items\)"):
        load_dataset(f"vqav2:{tmp_path / 'v'}")
    q, _ = _vqav2(tmp_path / "w", questions='{"info": {},\n "qs": []}')
    with pytest.raises(DataFormatError, match=r"line 1: .* no 'questions' key"):
        load_dataset(f"vqav2:{tmp_path / 'w'}")
    _vqav2(tmp_path / "x", questions='{"info": {},\n "questions": {"10": {}}}')
    with pytest.raises(DataFormatError, match=r"line 2: 'questions' must be a JSON list"):
        load_dataset(f"vqav2:{tmp_path / 'x'}")


def test_empty_invalid_and_non_utf8_json(tmp_path):
    q, _ = _vqav2(tmp_path / "e", questions="  \n")
    with pytest.raises(DataFormatError, match=r"questions file .*questions.json, line 1: the file is empty"):
        load_dataset(f"vqav2:{tmp_path / 'e'}")
    _vqav2(tmp_path / "j", questions='{"questions": [\n  {"question_id": 1,}\n]}')
    with pytest.raises(DataFormatError, match=r"line 2, column \d+: not valid JSON"):
        load_dataset(f"vqav2:{tmp_path / 'j'}")
    gqa = tmp_path / "gqa"
    gqa.mkdir()
    (gqa / "testdev_balanced_questions.json").write_bytes(b'{\n"1": {"imageId": "a",\n"question": "caf\xe9?"}}')
    png(gqa / "images" / "a.jpg")
    with pytest.raises(DataFormatError, match=r"balanced_questions.json, line 3: not UTF-8 text \(byte 0xe9"):
        load_dataset(f"gqa:{gqa}")


def test_wrong_top_level_types(tmp_path):
    gqa = tmp_path / "gqa"
    gqa.mkdir()
    (gqa / "testdev_balanced_questions.json").write_text('"just a string"')
    png(gqa / "images" / "a.jpg")
    with pytest.raises(DataFormatError, match="GQA questions file .* got a JSON string"):
        load_dataset(f"gqa:{gqa}")
    tv = tmp_path / "textvqa"
    tv.mkdir()
    (tv / "TextVQA_0.5.1_val.json").write_text(json.dumps([{"question_id": 1}]))
    png(tv / "train_images" / "x.jpg")
    with pytest.raises(DataFormatError, match=r"TextVQA questions file .* got a JSON list"):
        load_dataset(f"textvqa:{tv}")
    sqa = tmp_path / "sqa"
    sqa.mkdir()
    (sqa / "problems.json").write_text(json.dumps([{"question": "q"}]))
    (sqa / "images").mkdir()
    with pytest.raises(DataFormatError, match=r"ScienceQA problems file .*problems.json, line 1: .* got a JSON list"):
        load_dataset(f"scienceqa:{sqa}")
    (sqa / "problems.json").write_text(json.dumps({"5": {"question": "q", "choices": ["a"], "answer": 0,
                                                         "image": "image.png", "split": "test"}}))
    (sqa / "pid_splits.json").write_text(json.dumps(["5"]))
    with pytest.raises(DataFormatError, match=r"pid_splits.json, line 1: .* got a JSON list"):
        load_dataset(f"scienceqa:{sqa}")
    (sqa / "pid_splits.json").write_text(json.dumps({"train": ["5"]}))
    with pytest.raises(DataFormatError, match=r"no split 'test' \(splits: 'train'\)"):
        load_dataset(f"scienceqa:{sqa}")


def test_pope_malformed_files(tmp_path):
    root = tmp_path / "pope"
    root.mkdir()
    png(tmp_path / "val2014" / "COCO_1.jpg")
    f = root / "coco_pope_random.json"
    f.write_text("")
    with pytest.raises(DataFormatError, match=r"no usable question in .*pope \(0 record\(s\) read; it holds no "
                                              r"questions\)"):
        load_dataset(f"pope:{root}?images={tmp_path / 'val2014'}")
    f.write_bytes(b'{"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a cat?", "label": "yes"}\n'
                  b'{"question_id": 2, "image": "COCO_1.jpg", "text": "\xff", "label": "no"}\n')
    with pytest.raises(DataFormatError, match=r"POPE file .*coco_pope_random.json, line 2: not UTF-8"):
        load_dataset(f"pope:{root}?images={tmp_path / 'val2014'}")
    f.write_text('{"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a cat?", "label": "yes"}\n'
                 '[1, 2]\n"text"\n')
    ds = load_dataset(f"pope:{root}?images={tmp_path / 'val2014'}")
    assert len(ds.samples) == 1 and ds.malformed == 2
    assert ds.malformed_examples[0].startswith("coco_pope_random.json line 2: ")
    assert "expected a JSON object, got a JSON list" in ds.malformed_examples[0]
    f.write_text('[1, 2]\n"text"\n')
    with pytest.raises(DataFormatError, match=r"no usable question .* 2 malformed record\(s\), e.g. "
                                              r"coco_pope_random.json line 1"):
        load_dataset(f"pope:{root}?images={tmp_path / 'val2014'}")


def test_missing_image_files(tmp_path):
    _vqav2(tmp_path / "v", images=False)  # the image folder exists but holds none of the images
    with pytest.raises(DataError, match=r"none of the first 1 image files exists \(e.g. .*"
                                        r"COCO_val2014_000000000042.jpg\); is .*val2014 the image folder\? "
                                        r"pass \?images=DIR"):
        load_dataset(f"vqav2:{tmp_path / 'v'}")
    # one missing image among present ones is the runner's business (counted, never fatal)
    qs = {"questions": [{"question_id": 10, "image_id": 42, "question": "a"},
                        {"question_id": 11, "image_id": 43, "question": "b"}]}
    anns = {"annotations": [{"question_id": q, "answers": [{"answer": "red"}] * 10} for q in (10, 11)]}
    _vqav2(tmp_path / "w", json.dumps(qs), json.dumps(anns))
    assert len(load_dataset(f"vqav2:{tmp_path / 'w'}").samples) == 2


def test_cli_reports_data_errors(tmp_path, capsys, monkeypatch):
    _vqav2(tmp_path / "v", questions="[]")
    monkeypatch.setattr(cli, "_available_methods", lambda: ["fastv"])
    rc = cli.main(["--model", "fake", "--data", f"vqav2:{tmp_path / 'v'}", "--methods", "fastv", "--keep", "64",
                   "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "vtoken eval: VQAv2 questions file" in err and "got a JSON list" in err


# --- resuming from what is on disk --------------------------------------------------------------


def _snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture
def finished(tmp_path):
    """A finished run's output directory (merged predictions.jsonl) and its config."""
    cfg = config(tmp_path, methods=["fastv"], keeps=[64])
    run_eval(cfg, backend=FakeBackend(), datasets=make_datasets(tmp_path, n=5))
    return cfg, tmp_path / "out"


def _corrupt_and_resume(cfg, out, tmp_path, name, lineno, line):
    path = out / name
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    lines.insert(lineno - 1, line + "\n")
    path.write_text("".join(lines), encoding="utf-8")
    before = _snapshot(out)

    def no_model():
        raise AssertionError("a bad file must stop the run before any model is loaded")

    with pytest.raises(DataFormatError) as e:
        run_eval(cfg, backend_factory=no_model, datasets=make_datasets(tmp_path, n=5))
    assert _snapshot(out) == before  # nothing written, truncated or merged
    return str(e.value)


def test_resume_with_a_json_array_line(finished, tmp_path):
    cfg, out = finished
    msg = _corrupt_and_resume(cfg, out, tmp_path, "predictions.jsonl", 3, '["SetA", "a1", "fastv", "64"]')
    assert str(out / "predictions.jsonl") in msg and "line 3" in msg
    assert "expected a JSON object (one prediction record per line), got a JSON list (4 items)" in msg
    assert "nothing in" in msg and "was changed" in msg


def test_resume_with_a_record_missing_keys(finished, tmp_path):
    cfg, out = finished
    msg = _corrupt_and_resume(cfg, out, tmp_path, "predictions.jsonl", 2, '{"id": "a1", "method": "fastv"}')
    assert "predictions.jsonl, line 2: the prediction record lacks 'dataset', 'keep'" in msg


def test_resume_with_wrong_types_and_bad_part_file(finished, tmp_path):
    cfg, out = finished
    msg = _corrupt_and_resume(cfg, out, tmp_path, "predictions.jsonl", 1,
                              '{"dataset": ["SetA"], "id": "a1", "method": "fastv", "keep": "64", "error": "x"}')
    assert "line 1" in msg and "wrong type (dataset=['SetA']" in msg
    (out / "predictions.jsonl").write_text("".join(
        ln for ln in (out / "predictions.jsonl").read_text().splitlines(keepends=True)[1:]))
    msg = _corrupt_and_resume(cfg, out, tmp_path, "predictions.part-0.jsonl", 1, '"half a record"')
    assert "predictions.part-0.jsonl, line 1" in msg and "got a JSON string" in msg


def test_resume_with_bad_timings_or_run_config(finished, tmp_path):
    cfg, out = finished
    msg = _corrupt_and_resume(cfg, out, tmp_path, "timings.jsonl", 1, "[12.0, 3.0]")
    assert "timings.jsonl, line 1" in msg and "got a JSON list" in msg
    (out / "timings.jsonl").write_text("".join((out / "timings.jsonl").read_text().splitlines(keepends=True)[1:]))
    (out / "run_config.json").write_text('["fake", "auto", 16]')
    before = _snapshot(out)
    with pytest.raises(DataFormatError, match=r"run_config.json, line 1: expected a JSON object like"):
        run_eval(cfg, backend=FakeBackend(), datasets=make_datasets(tmp_path, n=5))
    assert _snapshot(out) == before


def test_merge_validates_before_writing(finished, tmp_path):
    _, out = finished
    (out / "predictions.part-0.jsonl").write_text('{"dataset": "SetA"}\n')
    before = _snapshot(out)
    with pytest.raises(DataFormatError, match="part-0.jsonl, line 1: the prediction record lacks 'id'"):
        runner_mod.merge_outputs(out)
    assert _snapshot(out) == before


def test_killed_mid_character_resumes(tmp_path):
    """A kill can cut a line inside a multi-byte UTF-8 character: that line is skipped (its
    question computed again), the rest is kept."""
    one = run_eval(config(tmp_path, "one", methods=["fastv"], keeps=[64]), backend=FakeBackend(),
                   datasets=make_datasets(tmp_path, n=5))
    cfg = config(tmp_path, "two", methods=["fastv"], keeps=[64])
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, backend=FakeBackend(fail_after=12), datasets=make_datasets(tmp_path, n=5))
    part = tmp_path / "two" / "predictions.part-0.jsonl"
    kept = read_jsonl(part)
    assert kept
    with open(part, "ab") as f:
        f.write('{"dataset": "SetA", "prediction": "caf\u00e9'.encode("utf-8")[:-1])  # cut inside "é"
    resumed = FakeBackend()
    two = run_eval(cfg, backend=resumed, datasets=make_datasets(tmp_path, n=5))
    assert len(resumed.calls) == 2 * 10 - len([p for p in kept if not p.get("error")])  # 10 readable images
    drop = lambda rows: [{k: v for k, v in r.items() if k != "efficiency"} for r in rows]  # noqa: E731
    assert drop(one["rows"]) == drop(two["rows"])


def test_cli_interrupt_keeps_predictions_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_available_methods", lambda: ["fastv", "random"])
    args = ["--model", "fake", "--data", "synthetic", "--methods", "fastv,random", "--keep", "64",
            "--out", str(tmp_path / "out"), "--batch-size", "4", "--no-progress"]

    def with_backend(backend):
        monkeypatch.setattr(cli, "run_eval", functools.partial(runner_mod.run_eval, backend=backend,
                                                               datasets=make_datasets(tmp_path, n=9)))

    killed = FakeBackend(fail_after=30)  # Ctrl-C in the middle of a batch of the second config
    with_backend(killed)
    try:
        rc = cli.main(args)
    except KeyboardInterrupt:  # (an escaped KeyboardInterrupt would stop pytest itself)
        pytest.fail("Ctrl-C escaped `vtoken eval` as a traceback")
    assert rc == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "run the same command again to resume" in err
    part = tmp_path / "out" / "predictions.part-0.jsonl"
    first = read_jsonl(part)
    assert 0 < len(first) < 3 * 23 and len(killed.calls) == len([p for p in first if not p.get("error")])
    resumed = FakeBackend()
    with_backend(resumed)
    assert cli.main(args) == 0
    assert not ({q for q in resumed.calls} & {q for q in killed.calls})  # nothing computed twice
    assert len(resumed.calls) + len(killed.calls) == 3 * 22  # 23 questions a config, one unreadable image
    assert len(read_jsonl(tmp_path / "out" / "predictions.jsonl")) == 3 * 23


def test_cli_shard_runs_one_shard_without_a_launcher(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_available_methods", lambda: ["fastv"])
    monkeypatch.setattr(cli, "run_eval", lambda config, rank, world: seen.append((rank, world)))
    base = ["--model", "fake", "--data", "synthetic", "--methods", "fastv", "--keep", "64", "--out", str(tmp_path)]
    assert cli.main(base + ["--shard", "2/3"]) == 0
    assert seen == [(2, 3)]
    for bad in ("3/3", "x/2", "1"):
        with pytest.raises(SystemExit, match="--shard"):
            cli.main(base + ["--shard", bad])


def test_run_token_follows_the_run_id_of_a_launch(monkeypatch):
    monkeypatch.delenv("VTOKEN_EVAL_RUN_ID", raising=False)
    plain = runner_mod.run_token()
    monkeypatch.setenv("VTOKEN_EVAL_RUN_ID", "launch-1")
    one = runner_mod.run_token()
    monkeypatch.setattr(runner_mod.os, "getppid", lambda: 1)  # another parent (e.g. a `timeout` wrapper)
    assert runner_mod.run_token() == one != plain
    monkeypatch.setenv("VTOKEN_EVAL_RUN_ID", "launch-2")
    assert runner_mod.run_token() != one
