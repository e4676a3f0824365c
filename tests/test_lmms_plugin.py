"""The lmms-eval model ``vtoken`` (vtoken/lmms/), run through lmms-eval's own command line on the CPU.

A local task in lmms-eval's layout (a YAML task, its ``utils.py`` and a JSONL data file with PNG
images; no hub) holds vtoken's synthetic questions; ``python -m lmms_eval --model vtoken`` answers
them with the built-in ``vtoken/tiny-llava`` and FastV at 64 tokens, batch 3, and its predictions
must equal ``vtoken eval``'s (:func:`vtoken.eval.run_eval`, same checkpoint, method, budget, batch
size and questions). The kept-token accounting must be reported: the JSON file in the output path,
its per-question counts equal to ``vtoken eval``'s, and the averages in lmms-eval's results file.

Without the plugin (no ``lmms_eval.models`` entry point) lmms-eval stops with "Model 'vtoken' not
found" and the test fails. The test needs the ``lmms`` extra; it is skipped when ``lmms_eval`` is not
importable, unless ``VTOKEN_REQUIRE_LMMS=1`` (set by .ci/run, which installs it) makes that a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

N_QUESTIONS, BATCH, METHOD, KEEP, MAX_NEW = 6, 3, "fastv", 64, 16


def _require_lmms_eval():
    try:
        import lmms_eval  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken dependency of it
        if os.environ.get("VTOKEN_REQUIRE_LMMS") == "1":
            pytest.fail(f"lmms_eval is required here (VTOKEN_REQUIRE_LMMS=1) but does not import: {exc!r}")
        pytest.skip(f"lmms-eval is not importable ({type(exc).__name__}: {exc}); install it with "
                    "pip install -e '.[lmms]'")


UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].strip().lower())}
'''


def write_task(root: Path, samples) -> Path:
    """A task folder in lmms-eval's layout over ``samples`` (vtoken.eval Samples); returns it."""
    from vtoken.eval.files import open_image

    task = root / "tasks" / "vtoken_synthetic"
    (task / "images").mkdir(parents=True)
    lines = []
    for i, s in enumerate(samples):
        path = task / "images" / f"{i}.png"
        open_image(s.image).save(path)
        lines.append(json.dumps({"id": s.id, "question": s.question, "answer": s.answers[0], "image": str(path)}))
    (task / "questions.jsonl").write_text("\n".join(lines) + "\n")
    (task / "utils.py").write_text(UTILS)
    (task / "vtoken_synthetic.yaml").write_text(textwrap.dedent(f"""\
        task: vtoken_synthetic
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {task / "questions.jsonl"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: {MAX_NEW}
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    return task.parent


def _prediction(sample: dict) -> str:
    """The model's answer in a line of lmms-eval's samples file (``resps`` is left out when it equals
    ``filtered_resps``; either may be nested in lists)."""
    resp = sample["resps"] if "resps" in sample else sample["filtered_resps"]
    while isinstance(resp, list):
        resp = resp[0]
    return resp


def _one(paths, what):
    paths = list(paths)
    assert len(paths) == 1, f"expected one {what}, found {[str(p) for p in paths]}"
    return paths[0]


@pytest.mark.slow
def test_lmms_eval_vtoken_model_matches_vtoken_eval(tmp_path):
    _require_lmms_eval()
    from vtoken.eval import EvalConfig, run_eval
    from vtoken.eval.loaders import load_dataset
    from vtoken.eval.records import read_predictions

    ds = load_dataset("synthetic", limit=N_QUESTIONS, seed=0)
    tasks = write_task(tmp_path, ds.samples)

    # vtoken eval's predictions on the same questions
    ref_out = tmp_path / "vtoken_eval"
    run_eval(EvalConfig(model="vtoken/tiny-llava", data=["synthetic"], methods=[METHOD], keeps=[KEEP],
                        limit=N_QUESTIONS, batch_size=BATCH, max_new_tokens=MAX_NEW, out=str(ref_out),
                        progress=False), datasets=[ds])
    ref = {r["id"]: r for r in read_predictions(ref_out / "predictions.jsonl")
           if r["method"] == METHOD and r.get("error") is None}
    assert len(ref) == N_QUESTIONS

    # lmms-eval's own command line with --model vtoken (found through the entry point)
    out = tmp_path / "lmms_out"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vtoken",
           "--model_args", f"pretrained=vtoken/tiny-llava,method={METHOD},keep={KEEP}",
           "--tasks", "vtoken_synthetic", "--include_path", str(tasks), "--batch_size", str(BATCH),
           "--device", "cpu", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    # lmms-eval's command line exits 0 even when the evaluation fails: its output files are the proof
    assert proc.returncode == 0 and list(out.rglob("*_results.json")), (
        f"lmms-eval wrote no results (exit {proc.returncode}):\n{log[-6000:]}")

    samples = [json.loads(line) for line in
               _one(out.rglob("*_samples_vtoken_synthetic.jsonl"), "samples file").read_text().splitlines() if line]
    assert len(samples) == N_QUESTIONS
    docs = {int(s["doc_id"]): s for s in samples}
    for i, sample in enumerate(ds.samples):
        pred = _prediction(docs[i])
        assert pred == ref[sample.id]["prediction"], (i, sample.question, pred, ref[sample.id]["prediction"])

    # the kept-token accounting: the JSON file in the output path ...
    acc = json.loads(_one(out.glob(f"vtoken_token_accounting_{METHOD}_{KEEP}_*.json"), "accounting file").read_text())
    assert (acc["model"], acc["method"], acc["keep"]) == ("vtoken/tiny-llava", METHOD, KEEP)
    rows = {int(r["doc_id"]): r for r in acc["samples"]}
    assert sorted(rows) == list(range(N_QUESTIONS))
    for i, sample in enumerate(ds.samples):
        want = ref[sample.id]
        for key in ("visual_tokens", "kept_tokens", "equivalent_tokens", "kept_per_stage", "stage_layers"):
            assert rows[i][key] == want[key], (i, key, rows[i][key], want[key])
        assert rows[i]["visual_tokens"] == 576 and rows[i]["kept_tokens"] == KEEP
    task = acc["tasks"]["vtoken_synthetic"]
    assert task["questions"] == N_QUESTIONS and task["kept_tokens"] == KEEP
    assert len(acc["summaries"]) == N_QUESTIONS // BATCH
    assert all(f"sample {b}: 576 visual tokens" in s["summary"] for s in acc["summaries"] for b in range(BATCH))
    # ... the log ...
    assert f"vtoken {METHOD} keep={KEEP} vtoken_synthetic: {N_QUESTIONS} questions, visual 576.0, kept 64.0" in log
    # ... and lmms-eval's results file, beside the score
    results = json.loads(_one(out.rglob("*_results.json"), "results file").read_text())
    score = results["results"]["vtoken_synthetic"]["exact_match,none"]
    assert score == pytest.approx(sum(r["score"] for r in ref.values()) / N_QUESTIONS)
    assert results["throughput"]["avg_vtoken_kept_tokens"] == KEEP
    assert results["throughput"]["avg_vtoken_visual_tokens"] == 576


def test_lmms_eval_finds_the_vtoken_model():
    """The entry point (pyproject.toml) registers model id ``vtoken`` with lmms-eval's registry."""
    _require_lmms_eval()
    from lmms_eval.models import get_model, list_available_models

    from vtoken.lmms.model import VTokenLMMS

    assert "vtoken" in list_available_models()
    assert get_model("vtoken") is VTokenLMMS


def test_loglikelihood_and_video_limits_are_named():
    """What the plugin does not do fails with the reason, not a traceback from deep inside."""
    _require_lmms_eval()
    from vtoken.errors import UnsupportedCallError
    from vtoken.lmms.answer import GenerationSettings, answer_function, generation_settings, truncate_at
    from vtoken.lmms.batching import make_batches
    from vtoken.lmms.model import VTokenLMMS

    with pytest.raises(UnsupportedCallError, match="generate_until only"):
        VTokenLMMS.loglikelihood(object.__new__(VTokenLMMS), [])
    zoo_answer = answer_function("vtoken.zoo", GenerationSettings(4))
    with pytest.raises(UnsupportedCallError, match="one image per question"):
        zoo_answer(None, None, [["clip.mp4"]], ["what happens?"], max_new_tokens=4)
    hf_answer = answer_function("transformers", GenerationSettings(4))

    class NoVideo:
        class config:  # noqa: N801 - stands in for a model config without a video token
            pass

    with pytest.raises(UnsupportedCallError, match="no video input"):
        hf_answer(NoVideo(), None, [["clip.mp4"]], ["what happens?"], max_new_tokens=4)

    s = generation_settings({"until": ["\n\n"], "max_new_tokens": 8, "temperature": 0, "do_sample": False})
    assert (s.max_new_tokens, s.until, s.extra) == (8, ["\n\n"], {})
    assert truncate_at("yes\n\nbecause", s.until) == "yes"
    args = [(f"q{d}", {"max_new_tokens": 8}, None, d, "t", "test") for d in (4, 0, 3, 1, 2)]
    batches = make_batches(args, 2)
    assert [b.doc_ids for b in batches] == [[0, 1], [2, 3], [4]]
    assert sorted(i for b in batches for i in b.indices) == list(range(5))


def test_several_images_per_question_are_pruned_per_image():
    """The path for real models with several images per question (batch 2, two images each): the
    pruning plan runs on it and the accounting counts both images of every question."""
    from vtoken.data.synthetic import make_split
    from vtoken.eval.backend import load_backend
    from vtoken.lmms.accounting import TokenAccounting
    from vtoken.lmms.answer import answer_function, generation_settings

    records = list(make_split("test", 4, 0))
    backend = load_backend("vtoken/tiny-llava", device="cpu", max_new_tokens=4)
    visuals = [[records[0]["image"], records[1]["image"]], [records[2]["image"], records[3]["image"]]]
    contexts = [records[0]["question"], records[2]["question"]]
    backend.answer_fn = answer_function("transformers", generation_settings({"max_new_tokens": 4}))
    with backend.configure("fastv", 16) as handle:
        out = backend.generate(visuals, contexts)
        summary = handle.stats.summary()
    backend.close()
    assert len(out.predictions) == 2 and all(isinstance(p, str) for p in out.predictions)
    assert out.visual_tokens == [1152, 1152] and out.kept_tokens == [32, 32]
    assert out.segment_tokens == [[576, 576], [576, 576]]
    assert summary.count("1152 visual tokens in 2 segment(s); kept L2:32;") == 2, summary
    acc = TokenAccounting({"method": "fastv", "keep": 16})
    acc.add("t", [0, 1], out, summary)
    assert acc.per_task()["t"]["kept_tokens"] == 32 and acc.per_task()["t"]["kept_per_stage"] == [32]


def test_sampling_settings_reach_generate():
    """A task that samples (temperature > 0) gets do_sample/temperature/top_p on both answer paths."""
    from vtoken import zoo
    from vtoken.data.synthetic import make_split
    from vtoken.lmms.answer import answer_function, generation_settings

    s = generation_settings({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 3})
    assert s.extra == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    model, processor = zoo.load("vtoken/tiny-llava")
    r = list(make_split("test", 1, 0))[0]
    for source in ("vtoken.zoo", "transformers"):
        out = answer_function(source, s)(model, processor, [[r["image"]]], [r["question"]], max_new_tokens=3)
        assert len(out) == 1 and isinstance(out[0], str)
