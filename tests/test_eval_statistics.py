"""Issue 21, item 2: statistics in every table. The Wilson interval (Wilson 1927) and the exact
McNemar test (McNemar 1947) against hand-computed values, the bootstrap statistics against the
table's own scores, the marking of cells not distinguishable from random, and the printed table."""

import csv
import dataclasses
import json
import math
import re

import numpy as np
import pytest

from test_eval_runner import FakeBackend, config, make_datasets
from vtoken.eval import cli
from vtoken.eval.config import DEFAULT_METHODS, QUICK_METHODS
from vtoken.eval.by_type import type_scores
from vtoken.eval.runner import run_eval
from vtoken.eval.scores import dataset_score
from vtoken.eval.significance import annotate_rows, compare, score_function, score_interval
from vtoken.eval.statistics import bootstrap_interval, mcnemar_exact, paired_sign_test, wilson_interval

Z = 1.959963984540054


def test_wilson_interval_hand_computed():
    # 8/10: p = .8, z² = 3.8415, centre = (.8 + z²/20) / (1 + z²/10) = .71674, half = .22658
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=5e-5) and hi == pytest.approx(0.94332, abs=5e-5)
    # the formula written out once more, independently
    z2 = Z * Z
    centre = (0.8 + z2 / 20) / (1 + z2 / 10)
    half = Z * math.sqrt(0.8 * 0.2 / 10 + z2 / 400) / (1 + z2 / 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)


def test_wilson_interval_edges():
    # 0/n and n/n: the interval touches 0 (1) exactly and is not empty: z²/(n + z²) on the other side
    for n in (1, 10, 64):
        lo, hi = wilson_interval(0, n)
        assert lo == 0.0 and hi == pytest.approx(Z * Z / (n + Z * Z), abs=1e-12)
        lo, hi = wilson_interval(n, n)
        assert hi == 1.0 and lo == pytest.approx(n / (n + Z * Z), abs=1e-12)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=5e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_mcnemar_exact_hand_computed():
    # b = 8, c = 1: p = 2 * (C(9,0) + C(9,1)) / 2^9 = 20 / 512
    assert mcnemar_exact(8, 1) == 0.0390625 == mcnemar_exact(1, 8)
    assert mcnemar_exact(5, 3) == pytest.approx(2 * (1 + 8 + 28 + 56) / 256)  # 0.7265625
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)


def test_paired_sign_test_counts_discordant_pairs_only():
    a = [1] * 8 + [0] * 1 + [1] * 20 + [0] * 11  # 8 right where b is wrong, 1 the other way, 31 ties
    b = [0] * 8 + [1] * 1 + [1] * 20 + [0] * 11
    t = paired_sign_test(a, b)
    assert (t["n"], t["better"], t["worse"]) == (40, 8, 1) and t["p"] == 0.0390625
    graded = paired_sign_test([0.9, 0.3, 1.0, 0.6], [0.6, 0.3, 0.0, 1.0])  # VQA-style scores: a sign test
    assert (graded["better"], graded["worse"]) == (2, 1)


def _recs(scores, prefix="q", **extra):
    return [{"id": f"{prefix}{i}", "score": float(s), "prediction": "", "answers": [""], **extra}
            for i, s in enumerate(scores)]


def test_marking_on_constructed_answer_vectors():
    random_ = [0] * 8 + [1] + [1] * 20 + [0] * 11
    better = [1] * 8 + [0] + [1] * 20 + [0] * 11    # 8 vs 1 discordant: p = 0.039 < 0.05, not marked
    close = [1] * 5 + [0] * 3 + [0] + [1] * 20 + [0] * 11  # 5 vs 1 discordant: p = 14/64, marked
    assert compare(_recs(better), _recs(random_))["same"] is False
    c = compare(_recs(close), _recs(random_))
    assert c["same"] is True and (c["better"], c["worse"]) == (5, 1) and c["p"] == 14 / 64
    # pairs are matched by question id, not by position
    assert compare(list(reversed(_recs(better))), _recs(random_))["p"] == 0.0390625
    assert compare(_recs(better), []) is None

    def row(method, keep):
        return {"method": method, "keep": keep}
    rows = [row("none", "full"), row("fastv", "64"), row("divprune", "64"), row("random", "64"), row("fastv", "32")]
    recs = [{"S": _recs([1] * 40)}, {"S": _recs(better)}, {"S": _recs(close)}, {"S": _recs(random_)}, {"S": _recs(close)}]
    summary = annotate_rows(rows, recs, {"S": "exact"})
    assert rows[1]["vs_random"]["S"]["same"] is False and rows[2]["vs_random"]["S"]["same"] is True
    assert rows[0]["vs_random"] is None and rows[3]["vs_random"] is None  # upper bound, random itself
    assert rows[4]["vs_random"] is None  # no random row at keep 32
    assert summary["present"] is True
    lo, hi = wilson_interval(28, 40)
    assert rows[1]["intervals"]["S"] == {"low": 100 * lo, "high": 100 * hi, "method": "wilson"}
    # a method with no answers at a budget (it could not run) is not tested, and random there still
    # counts as present; a random row without answers is what the legend reports as missing
    rows = [row("none", "full"), row("holitom", "64"), row("fastv", "64"), row("random", "64"), row("random", "32"),
            row("fastv", "32")]
    summary = annotate_rows(rows, [recs[0], {"S": []}, recs[1], recs[3], {"S": []}, recs[1]], {"S": "exact"})
    assert summary["missing_keeps"] == ["32"] and rows[1]["vs_random"] is None and rows[5]["vs_random"] is None
    assert rows[2]["vs_random"]["S"]["same"] is False
    no_random = [r for r in (row("none", "full"), row("fastv", "64"))]
    assert annotate_rows(no_random, recs[:2], {"S": "exact"})["present"] is False
    assert no_random[1]["vs_random"] is None


def test_bootstrap_statistics_equal_the_table_scores():
    """On the identity draw, each metric's bootstrap statistic is the table's headline score."""
    rng = np.random.default_rng(1)
    pope = [{"id": f"p{i}", "score": 0.0, "prediction": rng.choice(["yes", "No.", "yes, it is"]),
             "answers": [rng.choice(["yes", "no"])], "qtype": ["random", "popular", "adversarial"][i % 3]}
            for i in range(60)]
    mme = [{"id": f"m{i}", "group": f"img{i // 2}", "qtype": ["count", "OCR", "code_reasoning"][i // 2 % 3],
            "prediction": "Yes", "answers": [rng.choice(["yes", "no"])], "score": 0.0} for i in range(48)]
    for r in mme:
        r["score"] = float(r["answers"][0] == "yes")
    vqa = _recs(rng.choice([0, 0.3, 0.6, 0.9, 1.0], size=50))
    for metric, recs in (("pope", pope), ("mme", mme), ("vqa", vqa)):
        f = score_function(metric, recs)
        assert f(np.arange(len(recs))) == pytest.approx(dataset_score(metric, recs)["score"], abs=1e-9), metric
        iv = score_interval(metric, recs)
        assert iv["method"] == "bootstrap" and iv["low"] < dataset_score(metric, recs)["score"] < iv["high"]
        assert score_interval(metric, recs) == iv  # fixed seed: the same interval every time
    assert bootstrap_interval(0, lambda idx: 0.0) is None


def _table(tmp_path, out="out", **kw):
    run_eval(config(tmp_path, out=out, **kw), backend=FakeBackend(), datasets=make_datasets(tmp_path))
    return (tmp_path / out / "table.md").read_text(encoding="utf-8")


def test_printed_table_has_intervals_and_legend(tmp_path, capsys, monkeypatch):
    md = _table(tmp_path)
    body = [line for line in md.splitlines() if line.startswith("| ") and "*" not in line][1:]
    assert body and all(re.search(r"\| \d+\.\d \[\d+\.\d, \d+\.\d\]", line) for line in body)
    assert all(re.search(r"\d+\.\d% \[\d+\.\d, \d+\.\d\]", line) for line in body[1:])  # Avg, pruned rows
    assert "Wilson 1927" in md and "McNemar 1947" in md and "≈ = not distinguishable from Random" in md
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    fastv = [r for r in res["rows"] if r["method"] == "fastv"][0]
    assert fastv["intervals"]["SetA"]["method"] == "wilson" and fastv["intervals"]["PopeSet"]["method"] == "bootstrap"
    assert set(fastv["vs_random"]) == {"SetA", "SetB", "PopeSet"}
    with open(tmp_path / "out" / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[1]["SetA_ci_low"]) <= float(rows[1]["SetA"]) <= float(rows[1]["SetA_ci_high"])
    assert rows[1]["SetA_p_vs_random"] != "" and rows[0]["SetA_p_vs_random"] == ""
    # what `vtoken eval` prints is that table
    monkeypatch.setattr(cli, "run_eval", lambda c, rank=0, world=1: res)
    assert cli.main(["--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "[low, high] = 95 % interval" in capsys.readouterr().out


def test_marks_follow_mcnemar_and_absent_random_is_said(tmp_path):
    md = _table(tmp_path)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    body = [line for line in md.split("\n- ")[0].splitlines() if line.startswith("| ") and "*" not in line][1:]
    names = ["SetA", "SetB", "PopeSet"]
    assert len(body) == len(res["rows"])
    marked = 0
    for line, r in zip(body, res["rows"]):
        cells = line.split(" | ")[1:4]
        for name, cell in zip(names, cells):
            test = (r["vs_random"] or {}).get(name)
            assert ("≈" in cell) == bool(test and test["p"] >= 0.05), (r["method"], r["keep"], name, cell)
            marked += "≈" in cell
    assert marked  # the fake model's small sets leave some cells indistinguishable from random
    md = _table(tmp_path, out="out2", methods=["fastv"])
    assert "≈" not in md.split("\n- ")[0] and "`random` is not in this run" in md


def test_default_runs_compare_with_random():
    assert "random" in QUICK_METHODS and "random" in DEFAULT_METHODS
    cfg = cli.config_from_args(cli.build_parser().parse_args([]))
    assert "random" in cfg.methods and cfg.limit == cli.DEFAULT_LIMIT >= 64


def test_type_scores_hand_computed():
    recs = _recs([1, 1, 0, 1], qtype="left") + _recs([0, 0, 1], prefix="r", qtype="above")
    recs.append({"id": "x", "score": 1.0, "qtype": "left", "error": "unreadable"})  # failed: not counted
    per = type_scores("exact", recs)
    lo, hi = wilson_interval(3, 4)
    assert per["left"] == {"score": 75.0, "n": 4, "low": 100 * lo, "high": 100 * hi}
    assert per["above"]["score"] == pytest.approx(100 / 3) and per["above"]["n"] == 3
    graded = type_scores("vqa", _recs([0.3, 1.0], qtype="a") + _recs([0.6], prefix="b", qtype="b"))
    # graded scores: the main table's bootstrap over the type's questions (resamples of {0.3, 1.0}
    # average to 30, 65 or 100), not a Wilson interval
    assert graded["a"]["score"] == 65.0 and graded["a"]["n"] == 2
    assert 30.0 <= graded["a"]["low"] <= 65.0 <= graded["a"]["high"] <= 100.0
    assert graded["a"]["low"] < graded["a"]["high"]
    assert type_scores("exact", _recs([1, 0], qtype="only")) is None  # one type: nothing to break down
    assert type_scores("pope", recs) is None and type_scores("mme", recs) is None


def test_report_breaks_scores_down_by_question_type(tmp_path):
    datasets = make_datasets(tmp_path)
    a = datasets[0]
    for i, s in enumerate(a.samples):
        a.samples[i] = dataclasses.replace(s, qtype="even" if i % 2 == 0 else "odd")
    run_eval(config(tmp_path), backend=FakeBackend(), datasets=datasets)
    out = tmp_path / "out"
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    md = (out / "by_type.md").read_text(encoding="utf-8")
    assert "### SetA" in md and "### SetB" not in md and "### PopeSet" not in md  # untyped / POPE: none
    assert "by_type.md" in (out / "table.md").read_text(encoding="utf-8")
    res = json.loads((out / "results.json").read_text())
    lines = [line for line in md.splitlines() if line.startswith("| ") and "Method" not in line]
    assert len(lines) == len(res["rows"])
    for row, line in zip(res["rows"], lines):
        for qtype in ("even", "odd"):
            mine = [p for p in preds if p["dataset"] == "SetA" and p["method"] == row["method"]
                    and p["keep"] == row["keep"] and p.get("error") is None and int(p["id"][1:]) % 2 == (qtype == "odd")]
            expected = 100.0 * sum(p["score"] for p in mine) / len(mine)
            assert row["by_type"]["SetA"][qtype]["score"] == pytest.approx(expected)
            assert row["by_type"]["SetA"][qtype]["n"] == len(mine)
            assert f"{expected:.1f} [" in line
    run_eval(config(tmp_path, out="plain"), backend=FakeBackend(), datasets=make_datasets(tmp_path)[1:])
    assert not (tmp_path / "plain" / "by_type.md").exists()


def test_the_whole_fraction_is_not_the_one_token_budget():
    """keep=1.0 (every visual token) and keep=1 (one token) are different budgets: their keys, parsed
    budgets and table blocks differ (the fraction was reported as "Retain 1 tokens (↓99.8%)")."""
    from vtoken.eval.records import keep_key, parse_keep
    from vtoken.eval.table import block_label

    assert keep_key(1.0) != keep_key(1) and parse_keep(keep_key(1.0)) == 1.0
    assert isinstance(parse_keep(keep_key(1.0)), float) and parse_keep(keep_key(1)) == 1
    assert [parse_keep(keep_key(k)) for k in (0.333, 0.5, 64, 1e-7)] == [0.333, 0.5, 64, 1e-7]
    assert block_label(parse_keep(keep_key(1.0)), 576) == "Retain 100.0% tokens (↓0.0%)"
    assert block_label(parse_keep(keep_key(1)), 576) == "Retain 1 tokens (↓99.8%)"
