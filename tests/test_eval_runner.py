"""The eval loop with a fake model: outputs, table format, resume, sharding, failures, CLI."""

import contextlib
import csv
import hashlib
import json

import pytest
import torch
from PIL import Image

from vtoken.eval import cli
from vtoken.eval.backend import BatchOutput
from vtoken.eval.loaders import EvalDataset, Sample
from vtoken.eval.metrics import exact_match, pope_metrics, vqa_accuracy
from vtoken.eval.runner import EvalConfig, merge_outputs, read_jsonl, run_eval
from vtoken.eval.table import block_label

N_VISUAL = 576


class FakeBackend:
    """Answers right with a probability that falls with the budget; deterministic per question."""

    def __init__(self, fail_after=None):
        self.calls = []  # (method, keep, question) per generated question
        self.method, self.keep = None, None
        self.fail_after = fail_after
        self.info = {"device_name": "fake", "dtype": "float32"}

    @contextlib.contextmanager
    def configure(self, method, keep, budget_count="final"):
        self.method, self.keep = method, keep
        yield None
        self.method, self.keep = None, None

    def _answer(self, question):
        right, wrong = question.split("|")[1], "zzz"
        if self.method == "none":
            return right
        frac = self.keep / N_VISUAL if isinstance(self.keep, int) else self.keep
        h = int(hashlib.sha1(f"{question}{self.method}{self.keep}".encode()).hexdigest(), 16) % 100
        return right if h < 40 + 60 * frac - (10 if self.method == "random" else 0) else wrong

    def generate(self, images, questions):
        if self.fail_after is not None and len(self.calls) + len(questions) > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        for im in images:
            assert im.mode == "RGB"
        self.calls += [(self.method, self.keep, q) for q in questions]
        kept = N_VISUAL if self.method == "none" else (
            min(self.keep, N_VISUAL) if isinstance(self.keep, int) else round(self.keep * N_VISUAL))
        n = len(questions)
        return BatchOutput([self._answer(q) for q in questions], [N_VISUAL] * n, [kept] * n, [float(kept)] * n,
                           {"prefill_ms": 10.0 * kept / N_VISUAL, "decode_ms_per_token": 1.0, "wall_ms": 12.0,
                            "batch_size": n, "decode_steps": 3, "kv_cache_mib_per_sample": 0.5})


def _img(i):
    return Image.new("RGB", (4, 4), (i % 255, 0, 0))


def make_datasets(tmp_path, n=11):
    a = EvalDataset("SetA", "synthetic", "exact", "fake", [
        Sample(f"a{i}", f"question {i}|ans{i % 3}", [f"ans{i % 3}"], _img(i), qtype="t") for i in range(n)])
    b = EvalDataset("SetB", "vqav2", "vqa", "fake", [
        Sample(f"b{i}", f"q {i}|{i % 2}", [str(i % 2)] * 10, _img(i)) for i in range(n - 3)])
    c = EvalDataset("PopeSet", "pope", "pope", "fake", [
        Sample(f"p{i}", f"is there {i}?|{'yes' if i % 2 else 'no'}", ["yes" if i % 2 else "no"], _img(i),
               qtype="random") for i in range(n - 1)])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    a.samples[4] = Sample("a4", "question 4|ans1", ["ans1"], str(bad))  # unreadable: counted, not fatal
    a.malformed = 2
    return [a, b, c]


def config(tmp_path, out="out", **kw):
    base = {"model": "fake", "data": [], "methods": ["fastv", "random"], "keeps": [192, 64], "batch_size": 4,
            "out": str(tmp_path / out), "progress": False}
    base.update(kw)
    return EvalConfig(**base)


def without_efficiency(rows):
    """Table rows minus the measured timings (which differ run to run)."""
    return [{k: v for k, v in r.items() if k != "efficiency"} for r in rows]


def score_columns(out):
    """table.csv up to the token columns (scores, Avg, tokens), i.e. without timings."""
    with open(out / "table.csv") as f:
        return [r[:-5] for r in csv.reader(f)]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_full_run_outputs(tmp_path):
    fake = FakeBackend()
    res = run_eval(config(tmp_path), backend=fake, datasets=make_datasets(tmp_path))
    out = tmp_path / "out"
    for name in ("table.md", "table.csv", "results.json", "predictions.jsonl", "timings.jsonl", "plot.png"):
        assert (out / name).exists(), name
    assert not list(out.glob("*.part-*"))
    preds = read_jsonl(out / "predictions.jsonl")
    # 5 configs x (11 + 8 + 10) questions, one unreadable image in SetA per config
    assert len(preds) == 5 * 29
    errors = [p for p in preds if p.get("error")]
    assert len(errors) == 5 and all("unreadable image" in e["error"] for e in errors)
    assert len(fake.calls) == 5 * 28
    for p in preds:
        assert set(p) >= {"dataset", "id", "method", "keep", "prediction", "answers", "score"}

    md = (out / "table.md").read_text()
    lines = md.splitlines()
    assert lines[2].startswith("| *Upper bound, 576 tokens (100%)*")
    assert "| *Retain 192 tokens (↓66.7%)*" in md and "| *Retain 64 tokens (↓88.9%)*" in md
    assert md.index("Retain 192") < md.index("Retain 64")
    assert "Prefill" not in lines[0] and "vtoken bench" in md  # no GPU timings: no timing columns, a note
    assert "1 unreadable/failed" in md

    rows = read_csv(out / "table.csv")
    assert [(r["method"], r["keep"]) for r in rows] == [("none", "full"), ("fastv", "192"), ("random", "192"),
                                                        ("fastv", "64"), ("random", "64")]
    assert float(rows[0]["avg_retained_pct"]) == pytest.approx(100.0)
    assert float(rows[0]["kept_tokens"]) == 576 and float(rows[3]["kept_tokens"]) == 64

    # every table number recomputed from predictions.jsonl with the public metrics
    for row in rows:
        mine = [p for p in preds if p["method"] == row["method"] and p["keep"] == row["keep"] and not p.get("error")]
        a = [exact_match(p["prediction"], p["answers"]) for p in mine if p["dataset"] == "SetA"]
        b = [vqa_accuracy(p["prediction"], p["answers"]) for p in mine if p["dataset"] == "SetB"]
        c = [p for p in mine if p["dataset"] == "PopeSet"]
        f1 = pope_metrics([p["prediction"] for p in c], [p["answers"][0] for p in c])["f1"]
        assert len(a) == 10 and len(b) == 8 and len(c) == 10
        assert float(row["SetA"]) == pytest.approx(100 * sum(a) / len(a), abs=1e-4)
        assert float(row["SetB"]) == pytest.approx(100 * sum(b) / len(b), abs=1e-4)
        assert float(row["PopeSet"]) == pytest.approx(100 * f1, abs=1e-4)
    ub = rows[0]
    for row in rows[1:]:
        rel = [float(row[d]) / float(ub[d]) * 100 for d in ("SetA", "SetB", "PopeSet")]
        assert float(row["avg_retained_pct"]) == pytest.approx(sum(rel) / 3, abs=1e-3)

    r = json.loads((out / "results.json").read_text())
    assert r["config"]["keeps"] == ["192", "64"] and r["versions"]["torch"]
    seta = next(d for d in r["datasets"] if d["name"] == "SetA")
    assert seta["failed_questions"] == 1 and seta["malformed_records"] == 2
    assert res["rows"][1]["efficiency"]["prefill_ms"] == pytest.approx(10 * 192 / 576)


def test_resume_recomputes_nothing_and_matches_one_shot(tmp_path):
    one = run_eval(config(tmp_path, "one"), backend=FakeBackend(), datasets=make_datasets(tmp_path))

    killed = FakeBackend(fail_after=50)
    with pytest.raises(KeyboardInterrupt):
        run_eval(config(tmp_path, "two"), backend=killed, datasets=make_datasets(tmp_path))
    part = tmp_path / "two" / "predictions.part-0.jsonl"
    first = read_jsonl(part)
    assert 0 < len(first) < 5 * 29
    with open(part, "a") as f:  # a half-written line, as a kill during a write leaves
        f.write('{"dataset": "SetA", "id": ')
    resumed = FakeBackend()
    two = run_eval(config(tmp_path, "two"), backend=resumed, datasets=make_datasets(tmp_path))
    done_before = {(p["dataset"], p["id"], p["method"], p["keep"]) for p in first if not p.get("error")}
    redone = {(m, k, q) for m, k, q in resumed.calls} & {(m, k, q) for m, k, q in killed.calls}
    assert not redone  # nothing computed before the kill is computed again
    assert len(resumed.calls) == 5 * 28 - len(done_before)
    assert without_efficiency(one["rows"]) == without_efficiency(two["rows"])
    assert score_columns(tmp_path / "one") == score_columns(tmp_path / "two")
    assert (tmp_path / "one" / "predictions.jsonl").read_text() == (tmp_path / "two" / "predictions.jsonl").read_text()

    # a third run finds everything done and needs no model at all
    def no_model():
        raise AssertionError("nothing should be computed")

    three = run_eval(config(tmp_path, "two"), backend_factory=no_model, datasets=make_datasets(tmp_path))
    assert without_efficiency(three["rows"]) == without_efficiency(two["rows"])


def test_two_rank_sharding_merges_to_one_shot(tmp_path):
    one = run_eval(config(tmp_path, "one"), backend=FakeBackend(), datasets=make_datasets(tmp_path))
    fakes = [FakeBackend(), FakeBackend()]
    assert run_eval(config(tmp_path, "dp"), backend=fakes[1], rank=1, world=2, datasets=make_datasets(tmp_path)) is None
    assert (tmp_path / "dp" / "predictions.part-1.jsonl").exists()
    assert list((tmp_path / "dp").glob(".rank-1-of-2.*.done"))  # rank 1's marker for rank 0's barrier
    two = run_eval(config(tmp_path, "dp"), backend=fakes[0], rank=0, world=2, datasets=make_datasets(tmp_path))
    q0 = {q for _, _, q in fakes[0].calls}
    q1 = {q for _, _, q in fakes[1].calls}
    assert q0 and q1 and not (q0 & q1)  # disjoint shards
    assert len(fakes[0].calls) + len(fakes[1].calls) == 5 * 28
    assert (tmp_path / "one" / "predictions.jsonl").read_text() == (tmp_path / "dp" / "predictions.jsonl").read_text()
    assert without_efficiency(one["rows"]) == without_efficiency(two["rows"])
    assert score_columns(tmp_path / "one") == score_columns(tmp_path / "dp")
    assert not list((tmp_path / "dp").glob("*.part-*")) and not list((tmp_path / "dp").glob(".rank-*"))


def test_fraction_budgets_and_labels(tmp_path):
    cfg = config(tmp_path, methods=["fastv"], keeps=[0.333, 0.111])
    run_eval(cfg, backend=FakeBackend(), datasets=make_datasets(tmp_path, n=5))
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| *Retain 33.3% tokens (↓66.7%)*" in md and "| *Retain 11.1% tokens (↓88.9%)*" in md
    assert block_label(128, 576) == "Retain 128 tokens (↓77.8%)"
    assert block_label(0.222, None) == "Retain 22.2% tokens (↓77.8%)"


def test_generation_failure_isolated(tmp_path):
    class Flaky(FakeBackend):
        def generate(self, images, questions):
            if any("question 7|" in q for q in questions):
                if len(questions) > 1:
                    raise RuntimeError("batch breaks")
                raise ValueError("this one question breaks the processor")
            return super().generate(images, questions)

    res = run_eval(config(tmp_path, methods=["fastv"], keeps=[64]), backend=Flaky(), datasets=make_datasets(tmp_path))
    seta = next(d for d in res["datasets"] if d["name"] == "SetA")
    assert seta["failed_questions"] == 2  # the unreadable image and the question that breaks generation
    assert "generation failed" in json.dumps(seta["failed_examples"])


def test_a_method_that_cannot_run_is_skipped_and_reported(tmp_path):
    class Broken(FakeBackend):
        @contextlib.contextmanager
        def configure(self, method, keep, budget_count="final"):
            if method == "bad":
                raise ValueError("stage layer 8 is outside the model's 4 decoder layers")
            with super().configure(method, keep):
                yield None

        def generate(self, images, questions):
            if self.method == "worse":
                raise RuntimeError("always")
            return super().generate(images, questions)

    res = run_eval(config(tmp_path, methods=["bad", "fastv", "worse"], keeps=[64]), backend=Broken(),
                   datasets=make_datasets(tmp_path))
    failed = {f["method"]: f["error"] for f in res["failed_configs"]}
    assert set(failed) == {"bad", "worse"}
    assert "outside the model" in failed["bad"] and "fails for every question" in failed["worse"]
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| bad (failed) | –" in md and "could not run" in md
    fastv = next(r for r in res["rows"] if r["method"] == "fastv")
    assert fastv["scores"]["SetA"] is not None and not fastv.get("failed")


def test_other_run_in_same_out_is_refused(tmp_path):
    run_eval(config(tmp_path, methods=["fastv"], keeps=[64]), backend=FakeBackend(),
             datasets=make_datasets(tmp_path, 5))
    with pytest.raises(SystemExit, match="different run"):
        run_eval(config(tmp_path, model="other", methods=["fastv"], keeps=[64]), backend=FakeBackend(),
                 datasets=make_datasets(tmp_path, 5))
    # more budgets in the same --out: only the new ones are computed
    fake = FakeBackend()
    run_eval(config(tmp_path, methods=["fastv"], keeps=[64, 128]), backend=fake, datasets=make_datasets(tmp_path, 5))
    assert {k for _, k, _ in fake.calls} == {128}


def test_merge_prefers_success_over_error(tmp_path):
    rec = {"dataset": "D", "id": "1", "index": 0, "method": "none", "keep": "full", "answers": ["x"]}
    (tmp_path / "predictions.jsonl").write_text(json.dumps(dict(rec, error="unreadable image", score=None)) + "\n")
    (tmp_path / "predictions.part-0.jsonl").write_text(json.dumps(dict(rec, prediction="x", score=1.0)) + "\n")
    merge_outputs(tmp_path)
    merged = read_jsonl(tmp_path / "predictions.jsonl")
    assert len(merged) == 1 and merged[0]["score"] == 1.0


def test_cli_parsing(monkeypatch):
    monkeypatch.setattr(cli, "_available_methods", lambda: ["dart", "divprune", "fastv", "none", "random", "uniform"])
    cfg = cli.config_from_args(cli.build_parser().parse_args([]))
    assert cfg.data == ["synthetic", "synthetic-detail", "easy-vqa"] and cfg.limit == cli.DEFAULT_LIMIT
    assert cfg.methods == ["fastv", "divprune", "random"] and cfg.model == "vtoken/tiny-llava"
    assert cfg.keeps == [192, 128, 64]  # LLaVA-1.5-style model: the field's token budgets
    args = cli.build_parser().parse_args(
        ["--model", "/x/qwen2-vl", "--data", "synthetic,easy-vqa", "--data", "gqa:/d", "--methods", "fastv,uniform",
         "--keep", "0.333,0.111", "--limit", "5", "--batch-size", "2", "--out", "o", "--device-map", "auto"])
    cfg = cli.config_from_args(args)
    assert cfg.data == ["synthetic", "easy-vqa", "gqa:/d"] and cfg.limit == 5 and cfg.keeps == [0.333, 0.111]
    assert cfg.methods == ["fastv", "uniform"] and cfg.device_map == "auto" and cfg.batch_size == 2
    qwen = cli.config_from_args(cli.build_parser().parse_args(["--model", "/x/qwen2-vl"]))
    assert qwen.keeps == [0.333, 0.222, 0.111]
    with pytest.raises(SystemExit, match="unknown"):
        cli.config_from_args(cli.build_parser().parse_args(["--methods", "nosuch"]))
    with pytest.raises(SystemExit):
        cli.config_from_args(cli.build_parser().parse_args(["--keep", "1.5"]))
    with pytest.raises(SystemExit, match="--data"):
        cli.config_from_args(cli.build_parser().parse_args(["--data", "imagenet:/x"]))


def test_a_failed_shard_stops_rank_0_instead_of_leaving_it_waiting(tmp_path, monkeypatch):
    from vtoken.eval.runner import ShardFailed

    monkeypatch.setenv("VTOKEN_EVAL_RUN_ID", "failed-shard-test")
    def oom():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # e.g. the model does not fit beside the others
        run_eval(config(tmp_path, "dp"), backend_factory=oom, rank=1, world=2, datasets=make_datasets(tmp_path))
    assert list((tmp_path / "dp").glob(".rank-1-of-2.*.failed"))
    with pytest.raises(ShardFailed, match="rank 1: RuntimeError: CUDA out of memory"):
        run_eval(config(tmp_path, "dp"), backend=FakeBackend(), rank=0, world=2, datasets=make_datasets(tmp_path))
    assert not list((tmp_path / "dp").glob(".rank-*.failed"))  # read once, then gone


def test_a_stale_done_marker_does_not_let_rank_0_merge_an_unfinished_shard(tmp_path, monkeypatch):
    """`--shard` launched by hand without $VTOKEN_EVAL_RUN_ID takes the shell's pid as run id, so a
    killed earlier launch from that shell leaves `.done` markers with this launch's name. Rank 0
    must wait until rank 1's records are really there, then report every question."""
    import threading
    import time

    from vtoken.eval.runner import run_token

    monkeypatch.setenv("VTOKEN_EVAL_RUN_ID", "same-shell")
    out = tmp_path / "stale"
    out.mkdir()
    (out / f".rank-1-of-2.{run_token()}.done").write_text("done\n")  # left by the killed launch
    result = {}

    def rank0():
        result["report"] = run_eval(config(tmp_path, "stale"), backend=FakeBackend(), rank=0, world=2,
                                    datasets=make_datasets(tmp_path))
        result["t"] = time.time()

    t = threading.Thread(target=rank0)
    t.start()
    time.sleep(3.0)
    assert t.is_alive(), "rank 0 merged while rank 1 had written nothing"
    t1 = time.time()
    run_eval(config(tmp_path, "stale"), backend=FakeBackend(), rank=1, world=2, datasets=make_datasets(tmp_path))
    t.join(timeout=60)
    assert not t.is_alive() and result["t"] >= t1
    preds = read_jsonl(out / "predictions.jsonl")
    n_questions = sum(len(ds.samples) for ds in make_datasets(tmp_path))
    assert len(preds) == n_questions * (1 + 2 * 2)  # unpruned + 2 methods x 2 budgets, both shards


def test_batch_jobs_log_where_their_time_goes(tmp_path, capsys):
    """A --no-progress run (the GPU scripts' shards) logs one line per (method, budget) with its
    batches, wall time and timed generation (each FakeBackend batch times 12 ms), then the totals;
    a run with a progress bar logs none of it."""
    import re

    datasets = make_datasets(tmp_path)
    run_eval(config(tmp_path), backend=FakeBackend(), datasets=datasets)
    err = capsys.readouterr().err
    lines = re.findall(r"\[rank 0\] (\S+)@(\S+): (\d+) batch\(es\), ([\d.]+) s wall, ([\d.]+) s timed", err)
    # none@full once, then fastv and random at 192, then at 64; SetA (11, one unreadable), SetB (8), PopeSet
    # (10) in batches of 4: 3 + 2 + 3 batches per configuration
    assert [(m, k) for m, k, *_ in lines] == [("none", "full"), ("fastv", "192"), ("random", "192"),
                                              ("fastv", "64"), ("random", "64")]
    assert all(int(b) == 8 for _, _, b, _, _ in lines)
    assert all(float(t) == pytest.approx(8 * 0.012, abs=0.006) for *_, t in lines)
    assert re.search(r"\[rank 0\] batches: [\d.]+ s wall, 0\.4[78] s timed generation; [\d.]+ s since the process", err)
    run_eval(config(tmp_path, "quiet", progress=True), backend=FakeBackend(), datasets=datasets)
    assert "[rank 0]" not in capsys.readouterr().err


def test_no_warmup_skips_the_untimed_pass():
    """--no-warmup (the sharded GPU tables): no untimed generate before a configuration's first
    timed batch on a GPU; by default there is one per (method, budget)."""
    from vtoken.eval.backend import ModelBackend
    from vtoken.eval.cli import build_parser, config_from_args

    class Timer:
        input_ids = t_start = kv_bytes = None
        ends = []

        def reset(self):
            pass

        def sync(self):
            pass

    def backend(warmup):
        b = object.__new__(ModelBackend)
        calls = []
        b.model, b.processor, b.max_new_tokens = None, None, 4
        b.answer_fn = lambda m, p, images, questions, max_new_tokens: calls.append(len(questions)) or ["a"] * len(questions)
        b.on_gpu, b.cuda_devices, b._timer, b._handle, b._visual_ids = True, [], Timer(), None, None
        b._config, b._warmed, b.warmup = ("fastv", 64), set(), warmup
        b._vision_memo, b._variant = None, None
        b.generate([None] * 3, ["q"] * 3)
        b.generate([None] * 3, ["q"] * 3)
        return calls

    assert backend(True) == [3, 3, 3]  # one untimed pass, then two timed batches
    assert backend(False) == [3, 3]
    assert config_from_args(build_parser().parse_args(["--no-warmup"])).warmup is False
    assert config_from_args(build_parser().parse_args([])).warmup is True


def test_a_device_that_runs_out_stops_the_run_instead_of_scoring_the_method(tmp_path):
    """Out of memory (e.g. many shards sharing one GPU) is the machine's limit, not the method's: the
    run stops with DeviceFailed, nothing of the batch is recorded (no error records, no skipped
    configuration), and the same command with the memory back resumes and answers it."""
    from vtoken.eval.batches import DeviceFailed

    class Crowded(FakeBackend):
        def generate(self, images, questions):
            if self.method == "fastv" and self.keep == 64:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
            return super().generate(images, questions)

    cfg = config(tmp_path, methods=["random", "fastv"], keeps=[64])
    with pytest.raises(DeviceFailed, match="fastv keep=64 ran on .*OutOfMemoryError.*running the same command again"):
        run_eval(cfg, backend=Crowded(), datasets=make_datasets(tmp_path))
    out = tmp_path / "out"
    recs = [r for p in out.glob("predictions*.jsonl") for r in read_jsonl(p)]
    assert recs and not [r for r in recs if r["method"] == "fastv" or "memory" in (r.get("error") or "")]
    assert not [f for p in out.glob("failed_configs*.jsonl") for f in read_jsonl(p)]

    backend = FakeBackend()
    res = run_eval(cfg, backend=backend, datasets=make_datasets(tmp_path))
    assert not res["failed_configs"] and {m for m, _, _ in backend.calls} == {"fastv"}
    fastv = next(r for r in res["rows"] if r["method"] == "fastv")
    assert fastv["scores"]["SetA"] is not None


def test_device_failures_are_told_from_a_method_that_cannot_run():
    from vtoken.errors import PruningConfigError
    from vtoken.eval.batches import is_device_failure

    assert is_device_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"))
    assert is_device_failure(RuntimeError("cusolver error: CUSOLVER_STATUS_INTERNAL_ERROR, when calling `cusolverDnCreate(handle)`"))
    assert is_device_failure(RuntimeError("CUDA error: unknown error"))
    assert not is_device_failure(RuntimeError("The size of tensor a (641) must match the size of tensor b (673)"))
    assert not is_device_failure(ValueError("stage layer 8 is outside the model's 4 decoder layers"))
    assert not is_device_failure(PruningConfigError("keep=100000 is more than this image's tokens; out of memory is not the cause"))


def test_the_report_names_the_device_that_answered_not_the_one_that_wrote_it(tmp_path):
    """A run computed elsewhere (a GPU's shards) and finished or merged here: the table's note names
    the device of the recorded batches."""
    class Elsewhere(FakeBackend):
        def __init__(self, name):
            super().__init__()
            self.info = {"device_name": name, "dtype": "float32"}

    cfg = config(tmp_path, methods=["fastv"], keeps=[64])
    run_eval(cfg, backend=Elsewhere("NVIDIA H100 80GB HBM3"), datasets=make_datasets(tmp_path))
    run_eval(cfg, backend=Elsewhere("cpu"), datasets=make_datasets(tmp_path))  # nothing left: writes the report
    assert "device: NVIDIA H100 80GB HBM3." in (tmp_path / "out" / "table.md").read_text()
