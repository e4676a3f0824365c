"""The eval script end to end with real ``transformers`` models on the CPU: a small random LLaVA
through the generic (chat-template) path, and the shipped reference checkpoints (CI check)."""

import csv
import json

import pytest

from vtoken.eval import cli
from vtoken.eval.metrics import exact_match, vqa_accuracy
from vtoken.eval.runner import read_jsonl


@pytest.fixture(scope="module")
def small_llava(tmp_path_factory):
    """A random LLaVA at 112 px (64 visual tokens) saved as a plain Hugging Face folder."""
    pytest.importorskip("transformers")
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from vtoken.zoo import build

    tok = build.build_tokenizer()
    cfg = build.build_config("llava", tok)
    cfg.vision_config.image_size = 112
    cfg.image_seq_length = 64
    import torch

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    ip = CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112},
                               do_center_crop=True, do_convert_rgb=True)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")
    path = tmp_path_factory.mktemp("small-llava")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def _check_table_against_predictions(out, datasets):
    """Every score in table.csv equals the metric recomputed from predictions.jsonl."""
    preds = read_jsonl(out / "predictions.jsonl")
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["method"] == "none" and rows[0]["keep"] == "full"
    for row in rows:
        for ds, metric in datasets.items():
            mine = [p for p in preds if p["dataset"] == ds and p["method"] == row["method"] and p["keep"] == row["keep"]
                    and not p.get("error")]
            assert mine, (ds, row["method"], row["keep"])
            fn = exact_match if metric == "exact" else vqa_accuracy
            expected = 100 * sum(fn(p["prediction"], p["answers"]) for p in mine) / len(mine)
            assert float(row[ds]) == pytest.approx(expected, abs=1e-3)
            assert all(p["score"] == fn(p["prediction"], p["answers"]) for p in mine)
    return rows, preds


def test_generic_hf_model_end_to_end(small_llava, tmp_path, monkeypatch):
    from vtoken.data import synthetic

    records = synthetic.make_split("test", 3, 0, image_size=112)
    monkeypatch.setattr(synthetic, "make_split", lambda split, n, seed=0, image_size=336, qtypes=None: records[:n])
    out = tmp_path / "out"
    rc = cli.main(["--model", str(small_llava), "--data", "synthetic", "--limit", "3", "--methods", "fastv",
                   "--keep", "16", "--batch-size", "2", "--max-new-tokens", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    _, preds = _check_table_against_predictions(out, {"Synthetic": "exact"})
    assert len(preds) == 6
    ub = [p for p in preds if p["method"] == "none"]
    fv = [p for p in preds if p["method"] == "fastv"]
    assert {p["visual_tokens"] for p in ub} == {64} and {p["kept_tokens"] for p in ub} == {64}
    assert {p["visual_tokens"] for p in fv} == {64} and {p["kept_tokens"] for p in fv} == {16}
    assert "Upper bound, 64 tokens (100%)" in (out / "table.md").read_text()
    assert "Retain 16 tokens (↓75.0%)" in (out / "table.md").read_text()
    timings = read_jsonl(out / "timings.jsonl")
    assert len(timings) == 4 and all(t["prefill_ms"] > 0 and t["decode_steps"] >= 1 for t in timings)
    kv = {t["method"]: t["kv_cache_mib_per_sample"] for t in timings}
    assert kv["fastv"] < kv["none"]  # FastV's later layers cache fewer tokens: measured, not estimated
    res = json.loads((out / "results.json").read_text())
    assert res["backend"]["source"] == "transformers" and res["upper_bound_tokens"] == 64


def test_shipped_checkpoints_short_eval(tmp_path):
    """CI: a short eval on the shipped checkpoints; the table's numbers equal those recomputed from
    the per-question predictions."""
    from vtoken import zoo

    missing = [n for n in ("vtoken/tiny-llava", "vtoken/tiny-qwen2vl") if n not in zoo.available()]
    if "vtoken/tiny-llava" in missing:
        pytest.skip(f"shipped checkpoints not present yet ({', '.join(missing)}); "
                    "train them with python -m vtoken.zoo.train")
    pytest.importorskip("easy_vqa")
    models = [n for n in ("vtoken/tiny-llava", "vtoken/tiny-qwen2vl") if n not in missing]
    for name in models:
        out = tmp_path / name.split("/")[1]
        keep = "64" if "llava" in name else "0.25"
        rc = cli.main(["--model", name, "--data", "synthetic", "easy-vqa", "--limit", "4", "--methods", "fastv",
                       "--keep", keep, "--batch-size", "4", "--out", str(out), "--no-progress"])
        assert rc == 0
        rows, preds = _check_table_against_predictions(out, {"Synthetic": "exact", "EasyVQA": "exact"})
        assert len(preds) == 2 * 2 * 4 and not any(p.get("error") for p in preds)
        assert float(rows[0]["Synthetic"]) + float(rows[0]["EasyVQA"]) > 0  # trained: the unpruned model answers
        for name_ in ("table.md", "results.json", "plot.png"):
            assert (out / name_).exists()
