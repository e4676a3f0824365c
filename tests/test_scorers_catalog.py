"""Properties every scorer keeps, the registered presets, and the methods table."""

import pytest
import torch

import vtoken
from vtoken.errors import PruningConfigError
from vtoken.methods import build_plan, make_scorer, method_spec
from vtoken.plan import Stage
from vtoken.scorers import (
    AgileScorer,
    AttentionFlowScorer,
    CDPrunerScorer,
    DARTScorer,
    DivPruneScorer,
    FasterVLMScorer,
    FastVScorer,
    FlowCutScorer,
    KeepAllScorer,
    PruneSIDScorer,
    PyramidDropScorer,
    RandomScorer,
    RolloutScorer,
    SCOPEScorer,
    SparseVLMScorer,
    UniformScorer,
    VARScorer,
    VisionZipScorer,
    VisPrunerScorer,
    ZipVLScorer,
    methods_table_markdown,
)
from vtoken.scorers.catalog import pyramiddrop_budgets, sparsevlm_budgets
from vtoken.scorers.testing import make_signals, random_signals

ALL_METHODS = {"fastv", "sparsevlm", "pyramiddrop", "fastervlm", "visionzip", "zipvl", "divprune", "dart", "agile",
               "scope", "cdpruner", "vispruner", "prunesid",
               "flowcut", "rollout", "attnflow", "var", "random", "uniform", "none"}

SCORERS = [
    FastVScorer(), FastVScorer(debias=True), FastVScorer(exclude_sinks=True),
    FastVScorer(debias=True, debias_trend="linear"),
    SparseVLMScorer(), SparseVLMScorer(recycle=True), SparseVLMScorer(debias=True),
    PyramidDropScorer(), FasterVLMScorer(), FasterVLMScorer(debias=True), VisionZipScorer(), ZipVLScorer(),
    ZipVLScorer(debias=True), DivPruneScorer(), DARTScorer(), DARTScorer(key_norm=1), AgileScorer(),
    FlowCutScorer(), FlowCutScorer(relay=False),
    RolloutScorer(), RolloutScorer(debias=True), AttentionFlowScorer(), AttentionFlowScorer(residual=0.3),
    FastVScorer(exclude_sinks=True, sink_rule="act"), FastVScorer(exclude_sinks=True, sink_rule="secondary"),
    VARScorer(sink_rule="act"), VARScorer(sink_rule="secondary"), VARScorer(), VARScorer(keep_sinks=True), RandomScorer(seed=3),
    UniformScorer(), KeepAllScorer(), SCOPEScorer(), SCOPEScorer(alpha=0.5, combine="add"), CDPrunerScorer(),
    CDPrunerScorer(negate=False), VisPrunerScorer(), VisPrunerScorer(important_ratio=0.25, step=3),
    PruneSIDScorer(), PruneSIDScorer(tokens_per_component=1, nms_scale=8.0, cap=1),
]
IDS = [repr(s)[:60] for s in SCORERS]

COUNTS = [23, 9, 1, 16]
BUDGETS = [7, 9, 1, 5]


def run(scorer, counts=COUNTS, budgets=BUDGETS, seed=0):
    sig = make_signals(**random_signals(counts, budgets, text_counts=[4, 2, 3, 5][: len(counts)], seed=seed))
    return sig, scorer.select(sig)


@pytest.mark.parametrize("scorer", SCORERS, ids=IDS)
def test_exact_budget_and_padding_never_selected(scorer):
    sig, sel = run(scorer)
    assert sel.keep.dtype == torch.bool and sel.keep.shape == sig.mask.shape
    assert not (sel.keep & ~sig.mask).any()
    got = sel.keep.sum(1)
    if scorer.adaptive:
        assert (got >= 1).all() and (got <= sig.budget).all()
    elif isinstance(scorer, KeepAllScorer):
        assert torch.equal(got, sig.counts)
    else:
        assert torch.equal(got, sig.budget)
    if sel.scores is not None:
        assert torch.isneginf(sel.scores[~sig.mask]).all()
        assert torch.isfinite(sel.scores[sig.mask]).all()
    if sel.merge_into is not None:
        src = sel.merge_into >= 0
        assert not (src & sel.keep).any() and not (src & ~sig.mask).any()
        s_idx, j = src.nonzero(as_tuple=True)
        assert sel.keep[s_idx, sel.merge_into[s_idx, j]].all()


@pytest.mark.parametrize("scorer", SCORERS, ids=IDS)
def test_deterministic(scorer):
    _, a = run(scorer, seed=4)
    _, b = run(scorer, seed=4)
    assert torch.equal(a.keep, b.keep)
    if a.merge_into is not None:
        assert torch.equal(a.merge_into, b.merge_into)


@pytest.mark.parametrize("scorer", SCORERS, ids=IDS)
def test_batch_equals_single_segment(scorer):
    """A segment is pruned the same way alone as inside a padded batch of other segments."""
    _, batch = run(scorer, seed=6)
    for s, (c, b) in enumerate(zip(COUNTS, BUDGETS)):
        full = random_signals(COUNTS, BUDGETS, text_counts=[4, 2, 3, 5], seed=6)
        one = {k: ([v[s]] if isinstance(v, list) else v[s:s + 1]) for k, v in full.items()
               if k not in ("counts", "budget", "text_counts")}
        one["full_query"] = full["full_query"][s:s + 1]
        m = int(full["full_query"][s]) + 1
        one["layer_attn_full"] = full["layer_attn_full"][s:s + 1, :, :m, :m]
        one["full_pos"] = full["full_pos"][s:s + 1, :c]
        sig = make_signals([c], [b], text_counts=[[4, 2, 3, 5][s]], **one)
        if isinstance(scorer, RandomScorer):
            sig.ordinal[:] = 0
        sel = scorer.select(sig)
        assert torch.equal(sel.keep[0], batch.keep[s, :c]), f"segment {s}"


def test_random_and_uniform_exact_budgets():
    for scorer in (RandomScorer(), UniformScorer()):
        for budgets in ([1, 1, 1, 1], [23, 9, 1, 16], [12, 4, 1, 8]):
            _, sel = run(scorer, budgets=budgets)
            assert sel.keep.sum(1).tolist() == budgets
    # uniform on a full grid spreads over rows and columns
    sig = make_signals([36], [6], grid=[(1, 6, 6)])
    keep = UniformScorer().select(sig).keep[0].view(6, 6)
    assert keep.sum() == 6 and keep.any(dim=1).sum() >= 2 and keep.any(dim=0).sum() >= 3


# ----------------------------------------------------------------------------- registry and presets


def test_available_methods():
    assert ALL_METHODS <= set(vtoken.available_methods())


def test_every_method_builds_a_plan():
    for name in ALL_METHODS:
        plan = build_plan(name, 64)
        assert plan and all(isinstance(st, Stage) for st in plan)
        spec = method_spec(name)
        assert spec.family in ("attention", "diversity", "flow", "sink", "baseline")
        if spec.family != "baseline":
            assert spec.paper
            doc = type(plan[0].scorer).__doc__ or ""
            assert "arXiv" in doc or "ACL" in doc, name


def test_scorers_constructible_by_name():
    for name in ALL_METHODS - {"none"}:
        assert make_scorer(name).name == name
    assert isinstance(Stage(layer=0, scorer="divprune", keep=8).scorer, DivPruneScorer)


def test_fastv_preset_unchanged_and_modifiers():
    (st,) = build_plan("fastv", 64)
    assert st.layer == 2 and st.keep == 64 and isinstance(st.scorer, FastVScorer) and st.mode == "select"
    (st,) = build_plan("fastv", 0.25, K=3, debias=True)
    assert st.layer == 3 and st.keep == 0.25 and st.scorer.debias
    with pytest.raises(PruningConfigError, match="option"):
        build_plan("fastv", 64, bogus=1)
    with pytest.raises(PruningConfigError):
        build_plan("divprune", 64, debias=True)  # not an attention method


def test_sparsevlm_preset_tables():
    assert sparsevlm_budgets(192) == (300, 200, 110)
    assert sparsevlm_budgets(128) == (303, 110, 36)
    assert sparsevlm_budgets(64) == (66, 30, 17)
    assert sparsevlm_budgets(32) == (33, 15, 8)  # half the 64 table
    assert sparsevlm_budgets(64, budget="final")[-1] == 64
    f = sparsevlm_budgets(1 / 3)
    assert f == pytest.approx((300 / 576, 200 / 576, 110 / 576))
    plan = build_plan("sparsevlm", 64)
    assert [st.layer for st in plan] == [2, 6, 15]
    assert [st.keep for st in plan] == [66, 30, 17]
    assert all(st.mode == "select" for st in plan)
    assert plan[0].scorer is plan[1].scorer
    plan = build_plan("sparsevlm", 64, recycle=True, layers=(1, 2, 3))
    assert [st.layer for st in plan] == [1, 2, 3] and all(st.mode == "merge" for st in plan)
    assert plan[0].scorer.recycle
    from vtoken.plan import equivalent_tokens
    # the paper's accounting: (2*576 + 4*300 + 10*200 + 16*110)/32 ~ 191 for stages at 2, 6, 16
    assert equivalent_tokens([2, 6, 16], list(sparsevlm_budgets(192)), 576, 32) == pytest.approx(191, abs=0.5)
    with pytest.raises(PruningConfigError):
        build_plan("sparsevlm", 64, layers=(2, 6))


def test_pyramiddrop_final_count_equals_keep():
    assert pyramiddrop_budgets(72) == (288, 144, 72)
    assert pyramiddrop_budgets(64) == (256, 128, 64)
    assert pyramiddrop_budgets(0.125) == (0.5, 0.25, 0.125)
    assert pyramiddrop_budgets(0.5) == (1.0, 1.0, 0.5)
    plan = build_plan("pyramiddrop", 64)
    assert [st.layer for st in plan] == [8, 16, 24] and [st.keep for st in plan] == [256, 128, 64]
    plan = build_plan("pyramiddrop", 10, layers=(1, 2), lam=0.5)
    assert [st.keep for st in plan] == [20, 10]


def test_pre_llm_presets():
    (st,) = build_plan("fastervlm", 64)
    assert st.layer == 0 and st.scorer.pre_llm_only and st.options == {}
    (st,) = build_plan("fastervlm", 64, vision_layers=(-2, -3))
    assert st.options == {"vision_layers": (-2, -3)}
    (st,) = build_plan("visionzip", 64)
    assert st.layer == 0 and st.mode == "merge" and st.scorer.split(64) == (54, 10)
    (st,) = build_plan("visionzip", 1.0, dominant=40, contextual=24)
    assert st.keep == 64 and st.scorer.split(64) == (40, 24)
    with pytest.raises(PruningConfigError):
        build_plan("visionzip", 64, dominant=54)
    (st,) = build_plan("divprune", 0.1)
    assert st.layer == 0 and st.keep == 0.1


def test_in_llm_presets():
    for name in ("zipvl", "dart", "agile", "flowcut", "rollout", "attnflow", "var"):
        (st,) = build_plan(name, 64)
        assert st.layer == 2, name
    (st,) = build_plan("zipvl", 1.0, threshold=0.9)
    assert st.scorer.adaptive and st.scorer.threshold == 0.9
    (st,) = build_plan("var", 64, K=3, tau=10.0, keep_sinks=True)
    assert st.layer == 3 and st.scorer.tau == 10.0 and st.scorer.keep_sinks
    (st,) = build_plan("dart", 64, pivot_image=2, pivot_text=0)
    assert st.scorer.pivot_image == 2 and st.scorer.pivot_text == 0


def test_mixed_plan_of_stages():
    plan = [Stage(0, DivPruneScorer(), 0.5), Stage(2, FastVScorer(debias=True), 0.25, mode="merge"),
            Stage(3, "var", 0.1)]
    from vtoken.plan import validate_plan
    assert validate_plan(plan, 4) == plan


def test_methods_table_markdown():
    table = methods_table_markdown()
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Method | Family | Stage(s) | Needs attention rows? | Text-guided? | Paper |")
    for name in ALL_METHODS:
        assert f"| `{name}` |" in table
    row = next(line for line in lines if line.startswith("| `fastv` |"))
    assert "yes" in row and "2403.06764" in row
    row = next(line for line in lines if line.startswith("| `divprune` |"))
    assert "| no | no |" in row
    assert lines[0].endswith("| Paper | Checked against released code |")
    row = next(line for line in lines if line.startswith("| `sparsevlm` |"))
    assert row.endswith("| Gumpest/SparseVLMs@26a5f48 (rank counts: @b72c5d6) |")
    assert next(line for line in lines if line.startswith("| `random` |")).endswith("| - | - |")


@pytest.mark.parametrize("scorer", SCORERS, ids=IDS)
def test_edge_budgets_keep_all_single_and_empty_segments(scorer):
    counts, budgets = [6, 1, 5], [6, 1, 1]
    kw = random_signals(counts, budgets, text_counts=[2, 1, 3], seed=8)
    sig = make_signals(**kw)
    sel = scorer.select(sig)
    got = sel.keep.sum(1).tolist()
    if scorer.adaptive:
        assert got[1] == 1 and 1 <= got[0] <= 6 and got[2] == 1
    else:
        assert got == [6, 1, 1] if not isinstance(scorer, KeepAllScorer) else got == [6, 1, 5]
    # a segment with no candidates left (mask all False) keeps nothing and breaks nothing
    sig = make_signals(**kw)
    sig.mask[2] = False
    sig.budget[2] = 0
    sig.index[2] = -1
    if sig.full_pos is not None:
        sig.full_pos[2] = -1
    sel = scorer.select(sig)
    assert sel.keep[2].sum() == 0 and not (sel.keep & ~sig.mask).any()


def test_depth_scaled_options_for_shallow_models():
    """The eval scales the papers' 32-layer stage positions to shallow models (hand-computed)."""
    from vtoken.methods import depth_scaled_options

    assert depth_scaled_options("pyramiddrop", 32) == {}  # (8, 16, 24) fit: unchanged
    assert depth_scaled_options("pyramiddrop", 4) == {"layers": (1, 2, 3)}  # round(1, 2, 3)
    assert depth_scaled_options("pyramiddrop", 16) == {"layers": (4, 8, 12)}
    assert depth_scaled_options("sparsevlm", 8) == {"layers": (1, 2, 4)}  # round(.5)=0 -> 1; round(1.5)=2; round(3.75)=4
    assert depth_scaled_options("sparsevlm", 3) == {}  # three stages need layers 1, 2, 3 < 3: impossible
    assert depth_scaled_options("fastv", 4) == {}  # no multi-stage layers option


def test_readme_methods_table_is_the_generated_one():
    """README.md's methods table is :func:`methods_table_markdown`'s output (regenerate it there)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert methods_table_markdown().strip() in readme
