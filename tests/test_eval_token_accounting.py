"""Token accounting of the eval table (issue 15, item 6): every row shows the visual tokens it
really keeps, measured from the pruning handle's stats; the table says which count its "Retain N"
blocks use, runs a preset that can count its budget either way (SparseVLM: its paper's (66, 30, 17)
at 64 is 17 final) by that count, and flags a row that still does not keep N by it."""

import csv
import functools
import json
import statistics

import pytest

from vtoken.eval import cli
from vtoken.eval import runner as runner_mod
from vtoken.eval.backend import BatchOutput
from vtoken.eval.runner import EvalConfig, read_jsonl, run_eval

from test_eval_runner import N_VISUAL, FakeBackend, make_datasets

MODEL = "vtoken/tiny-llava"
METHODS = ["fastv", "sparsevlm", "pyramiddrop"]
KEEP = 64


@pytest.fixture(scope="module")
def tiny_backend():
    from vtoken import zoo
    from vtoken.eval.backend import load_backend

    if MODEL not in zoo.available():
        pytest.skip(f"{MODEL} is not present")
    backend = load_backend(MODEL, device="cpu", dtype="float32", max_new_tokens=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def synthetic_set():
    from vtoken.eval.loaders import load_dataset

    return load_dataset("synthetic", limit=3)


def _measure_with_handle(backend, ds, method, keep, count="final"):
    """The counts of ``method`` at ``keep`` on the data set's questions, straight from a fresh
    pruning handle's stats (no eval machinery): per-question final / equivalent tokens, stages."""
    import vtoken
    from vtoken import zoo
    from vtoken.eval.loaders import open_image
    from vtoken.methods import depth_scaled_options

    model, proc = backend.model, backend.processor
    depth = model.config.get_text_config().num_hidden_layers
    options = depth_scaled_options(method, depth)
    if method == "sparsevlm":  # the one preset here that counts its budget either way
        options["budget"] = count
    handle = vtoken.apply_pruning(model, method=method, keep=keep, **options)
    try:
        images = [open_image(s.image) for s in ds.samples]
        zoo.answer(model, proc, images, [s.question for s in ds.samples], max_new_tokens=1)
        st = handle.stats
    finally:
        handle.remove()
    per_stage = st.kept_per_stage
    layers = [s.layer for s in st.stages]
    # the layer-averaged count recomputed by hand from the per-stage counts (docs/DESIGN.md §4)
    for b, row in enumerate(per_stage):
        total, cur, prev = 0.0, st.visual_tokens[b], 0
        for L, k in zip(layers, row):
            total, cur, prev = total + cur * (L - prev), k, L
        total += cur * (depth - prev)
        assert st.equivalent_tokens[b] == pytest.approx(total / depth)
    return {
        "final": statistics.fmean(row[-1] for row in per_stage),
        "equiv": statistics.fmean(st.equivalent_tokens),
        "stages": [statistics.fmean(row[i] for row in per_stage) for i in range(len(layers))],
        "layers": layers,
    }


def test_rows_show_measured_tokens_and_flag_budget_mismatch(tiny_backend, synthetic_set, tmp_path):
    cfg = EvalConfig(model=MODEL, data=[], methods=METHODS, keeps=[KEEP], batch_size=3, max_new_tokens=1,
                     out=str(tmp_path / "out"), progress=False)
    res = run_eval(cfg, backend=tiny_backend, datasets=[synthetic_set])
    out = tmp_path / "out"
    md = (out / "table.md").read_text(encoding="utf-8")
    with open(out / "table.csv", encoding="utf-8") as f:
        csv_rows = {r["method"]: r for r in csv.DictReader(f)}
    rows = {r["method"]: r for r in res["rows"]}
    assert res["budget_count"] == "final"
    header = md.splitlines()[0]
    assert "Kept (final) ← budget" in header and "Equiv. (layer-avg)" in header and "Kept per stage" in header
    assert "Budget blocks count FINAL visual tokens" in md

    measured = {m: _measure_with_handle(tiny_backend, synthetic_set, m, KEEP) for m in METHODS}
    for m in METHODS:
        got, row = measured[m], rows[m]
        # the row's counts are the handle's, not the preset's tables
        assert row["kept_tokens"] == pytest.approx(got["final"])
        assert row["equivalent_tokens"] == pytest.approx(got["equiv"])
        assert row["kept_per_stage"] == pytest.approx(got["stages"]) and row["stage_layers"] == got["layers"]
        assert float(csv_rows[m]["kept_tokens"]) == pytest.approx(got["final"], abs=1e-4)
        assert float(csv_rows[m]["equivalent_tokens"]) == pytest.approx(got["equiv"], abs=1e-4)
        assert [float(x) for x in csv_rows[m]["kept_per_stage"].split(";")] == pytest.approx(got["stages"], abs=1e-4)
        # ... and the table text shows them
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {row['label']}"))
        assert f"| {got['equiv']:.1f} |" in line or f"{got['equiv']:.1f} ≠" in line
        assert f"{got['final']:.1f}" in line
        stages = " → ".join(f"L{L}:{k:.0f}" for L, k in zip(got["layers"], got["stages"]))
        assert stages in line
        ok = got["final"] == KEEP
        assert row["budget_check"]["ok"] is ok and csv_rows[m]["budget_ok"] == ("yes" if ok else "no")
        assert ("⚠" in line) is (not ok)

    # every method keeps the block's 64 final tokens: SparseVLM ran with budget="final"
    assert len(measured["sparsevlm"]["stages"]) == 3
    assert all(measured[m]["final"] == KEEP for m in METHODS)
    assert res["budget_mismatches"] == []
    preds = read_jsonl(out / "predictions.jsonl")
    sp = [p for p in preds if p["method"] == "sparsevlm"]
    assert all(len(p["kept_per_stage"]) == 3 and p["segment_tokens"] == [576] for p in sp)

    # the same out directory cannot be resumed with another count (SparseVLM's predictions depend on it)
    cfg.budget_count = "equivalent"
    with pytest.raises(SystemExit, match="budget_count"):
        run_eval(cfg, backend=tiny_backend, datasets=[synthetic_set])

    # counted by layer-averaged tokens: SparseVLM runs its paper's tables (17 final at 64), and a
    # row whose equivalent count is not 64 (all of them on this 6-layer model) is flagged
    cfg.out = str(tmp_path / "out-equivalent")
    res2 = run_eval(cfg, backend=tiny_backend, datasets=[synthetic_set])
    md2 = (tmp_path / "out-equivalent" / "table.md").read_text(encoding="utf-8")
    assert "Equiv. (layer-avg) ← budget" in md2.splitlines()[0] and "LAYER-AVERAGED" in md2
    for m in METHODS:
        got = _measure_with_handle(tiny_backend, synthetic_set, m, KEEP, count="equivalent")
        row = next(r for r in res2["rows"] if r["method"] == m)
        assert row["kept_tokens"] == pytest.approx(got["final"])
        assert row["equivalent_tokens"] == pytest.approx(got["equiv"])
        ok = abs(got["equiv"] - KEEP) <= 0.05 * KEEP
        assert row["budget_check"]["ok"] is ok
        if not ok:
            assert f"{got['equiv']:.1f} ≠ {KEEP}" in md2
    assert next(r for r in res2["rows"] if r["method"] == "sparsevlm")["kept_tokens"] == 17


def test_counts_come_from_this_batch(tiny_backend, synthetic_set):
    """A batch whose prefill did not run through the pruning hooks has unknown counts (None),
    never the previous batch's stats or the unpruned count."""
    from vtoken.eval.loaders import open_image

    images = [open_image(s.image) for s in synthetic_set.samples[:2]]
    questions = [s.question for s in synthetic_set.samples[:2]]
    with tiny_backend.configure("fastv", KEEP):
        first = tiny_backend.generate(images, questions)
        assert first.kept_tokens == [KEEP, KEEP] and first.kept_per_stage == [[KEEP], [KEEP]]
        real = tiny_backend.answer_fn
        tiny_backend.answer_fn = lambda model, proc, ims, qs, **kw: ["x"] * len(qs)  # no forward at all
        try:
            second = tiny_backend.generate(images, questions)
        finally:
            tiny_backend.answer_fn = real
    assert second.kept_tokens == [None, None] and second.equivalent_tokens == [None, None]
    assert second.kept_per_stage is None


def test_budget_check_rules():
    from vtoken.eval.table import budget_check, budget_target

    # one 576-token image: final must be exact, equivalent within 5% (or half a token)
    rec = {"visual_tokens": 576, "kept_tokens": 17, "equivalent_tokens": 61.7}
    assert budget_target(64, rec) == 64 and budget_target(0.111, rec) == 64  # round(0.111 * 576)
    assert budget_check(64, [rec], "final")["ok"] is False
    assert budget_check(64, [rec], "equivalent")["ok"] is True  # SparseVLM's 64-table on 32 layers
    assert budget_check(64, [dict(rec, equivalent_tokens=120.5)], "equivalent")["ok"] is False
    assert budget_check(64, [dict(rec, kept_tokens=64)], "final")["ok"] is True
    # an image smaller than the budget keeps all of it
    assert budget_target(192, {"visual_tokens": 100}) == 100
    # two images of 576 prunable tokens plus 2 structural tokens (never pruned): 2 x 64 + 2
    two = {"visual_tokens": 1154, "segment_tokens": [576, 576], "kept_tokens": 130, "equivalent_tokens": 130.0}
    assert budget_target(64, two) == 130 and budget_check(64, [two], "final")["ok"] is True
    # counts not recorded: unverified, not silently fine
    chk = budget_check(64, [{"visual_tokens": 576, "kept_tokens": None}], "final")
    assert chk["ok"] is None and chk["unknown"] == 1
    assert budget_check(None, [rec]) is None  # the upper bound has no budget


def test_decode_time_plans_are_named_not_unverified():
    """A decode-time plan (no prefill stage: a2sf, lookm, lazyllm, zipvl_kv) records no kept counts;
    the table says what the row is instead of "budget unverified"; a prefill method without counts
    stays unverified."""
    from vtoken.eval.accounting import budget_message, decode_only

    chk = {"ok": None, "unknown": 300, "questions": 300, "count": "final"}
    row = {"label": "a2sf", "method": "a2sf", "kept_tokens": None, "budget_check": chk}
    assert decode_only(row)
    assert "decode-time plan" in budget_message(row, "Retain 64 tokens")
    other = dict(row, label="FastV", method="fastv")
    assert not decode_only(other)
    assert budget_message(other, "Retain 64 tokens").endswith("unverified.")
    assert not decode_only(dict(row, method="mustdrop_kv", kept_tokens=64.0))  # has prefill counts


class UnderBudget(FakeBackend):
    """Keeps a quarter of its budget after the last of three stages (like SparseVLM's tables)."""

    def generate(self, images, questions):
        out = super().generate(images, questions)
        if self.method == "sparsevlm":
            k = self.keep // 4
            out = BatchOutput(out.predictions, out.visual_tokens, [k] * len(questions),
                              [float(self.keep)] * len(questions), out.timing,
                              [[self.keep * 2, self.keep, k]] * len(questions), [[2, 6, 15]] * len(questions),
                              [[N_VISUAL]] * len(questions))
        return out


def _cli(monkeypatch, tmp_path, backend, *extra, out="out"):
    datasets = make_datasets(tmp_path, n=5)
    monkeypatch.setattr(cli, "run_eval", functools.partial(runner_mod.run_eval, backend=backend, datasets=datasets))
    monkeypatch.setattr(cli, "_available_methods", lambda: ["fastv", "sparsevlm"])
    return cli.main(["--model", "fake", "--data", "synthetic", "--methods", "fastv,sparsevlm", "--keep", "64",
                     "--out", str(tmp_path / out), "--no-progress", *extra])


def test_cli_flags_and_strict_budget(monkeypatch, tmp_path, capsys):
    assert _cli(monkeypatch, tmp_path, UnderBudget()) == 0
    err = capsys.readouterr().err
    assert "warning: SparseVLM in \"Retain 64 tokens (↓88.9%)\" keeps 16 visual tokens per image after its last " \
           "stage, not 64" in err
    md = (tmp_path / "out" / "table.md").read_text(encoding="utf-8")
    assert "| SparseVLM ⚠ |" in md and "16.0 ≠ 64" in md and "L2:128 → L6:64 → L15:16" in md
    assert "| FastV |" in md
    # strict: the report is written, the exit code says the table mixes budgets
    assert _cli(monkeypatch, tmp_path, UnderBudget(), "--strict-budget") == 1
    assert "error: SparseVLM" in capsys.readouterr().err
    # counted by layer-averaged tokens the under-budget row keeps 64: no flag, FastV's 64 too (fake)
    assert _cli(monkeypatch, tmp_path, UnderBudget(), "--budget-count", "equivalent", "--strict-budget",
                out="out-equivalent") == 0
    res = json.loads((tmp_path / "out-equivalent" / "results.json").read_text())
    assert res["budget_count"] == "equivalent" and res["budget_mismatches"] == []
