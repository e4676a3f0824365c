"""Every method end to end through ``vtoken.apply_pruning`` on tiny LLaVA, Qwen2-VL and Qwen3-VL:
exact budgets (via handle.stats), text never dropped, determinism, batch == per-sample.

A method whose signals the runtime cannot provide yet (e.g. vision-encoder attention, full
attention matrices) is reported as xfail with the runtime's message, so the test turns green by
itself once the signal is wired.
"""

import pytest
import torch

import tiny_models as tm
import vtoken
from conftest import get_inputs, get_model, slice_sample
from vtoken.errors import PruningConfigError
from vtoken.plan import tokens_for

# "qwen2_vl_images" / "qwen3_vl_images": a batch with images only (vision-encoder signals cover images)
ARCHS = ["llava", "qwen2_vl", "qwen2_vl_images", "qwen3_vl_images"]
SMALL = (1, 2, 3)  # the tiny models have 4 decoder layers

# case id -> (method, options)
CASES = {
    "fastv": ("fastv", {}),
    "fastv-debias": ("fastv", {"debias": True}),
    "fastv-sinks": ("fastv", {"exclude_sinks": True}),
    "sparsevlm": ("sparsevlm", {"layers": SMALL}),
    "sparsevlm-recycle": ("sparsevlm", {"layers": SMALL, "recycle": True}),
    "pyramiddrop": ("pyramiddrop", {"layers": SMALL}),
    "adaptinfer": ("adaptinfer", {"layers": SMALL}),
    "adaptinfer-all": ("adaptinfer", {"layers": SMALL, "rows": "all"}),
    "fastervlm": ("fastervlm", {}),
    "visionzip": ("visionzip", {}),
    "zipvl": ("zipvl", {"threshold": 0.5}),
    "zipvl-per-layer": ("zipvl", {"threshold": 0.5, "per_layer": True, "K": 1, "num_layers": 4}),
    "mustdrop": ("mustdrop", {"layers": SMALL, "merge_threshold": 0.03, "global_thr": 0.03, "individual_thr": 0.05}),
    "divprune": ("divprune", {}),
    "dart": ("dart", {}),
    "agile": ("agile", {}),
    "scope": ("scope", {}),
    "cdpruner": ("cdpruner", {}),
    "vispruner": ("vispruner", {}),
    "dycoke": ("dycoke", {}),
    "fastvid": ("fastvid", {}),
    "vscan": ("vscan", {"layers": 2}),
    "flowcut": ("flowcut", {}),
    "flowcut-norelay": ("flowcut", {"relay": False}),
    "flowcut-relay": ("flowcut", {"relay": "require"}),
    "rollout": ("rollout", {}),
    "attnflow": ("attnflow", {}),
    "attnflow-K3": ("attnflow", {"K": 3}),
    "fastv-sinks-act": ("fastv", {"exclude_sinks": True, "sink_rule": "act"}),
    "fastv-sinks-secondary": ("fastv", {"exclude_sinks": True, "sink_rule": "secondary"}),
    "var": ("var", {}),
    "var-act": ("var", {"sink_rule": "act"}),
    "var-secondary": ("var", {"sink_rule": "secondary"}),
    "random": ("random", {}),
    "uniform": ("uniform", {}),
    "none": ("none", {}),
}
KEEP = 0.3
IMAGE_IDS = (90, 91)


def model_and_inputs(arch):
    if arch.endswith("_images"):
        model = get_model(arch[: -len("_images")])
        items = [[("image", (1, 8, 8))], [("image", (1, 4, 8)), ("image", (1, 4, 4))], []]
        return model, tm.qwen_inputs(model, items, pad_side="left")
    model = get_model(arch)
    return model, get_inputs(arch, model)


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def run(model, inputs, method, options, keep=KEEP):
    """(logits, stats) of one pruned forward; xfail when the runtime lacks a signal."""
    try:
        with vtoken.apply_pruning(model, method=method, keep=keep, **options) as h:
            out = forward(model, inputs)
            return out, h.stats
    except PruningConfigError as exc:
        msg = str(exc)
        if "cannot provide" in msg or "so far" in msg or "not supported" in msg:
            pytest.xfail(f"signal not wired in the runtime yet: {msg}")
        raise


def last_slot(stats, inputs):
    m = inputs["attention_mask"].bool()
    idx = torch.arange(m.shape[1]).expand_as(m)
    target = torch.where(m, idx, -1).max(1).values
    return (stats.positions == target.unsqueeze(1)).int().argmax(1)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_exact_budgets_text_kept_deterministic(arch, case):
    method, options = CASES[case]
    model, inputs = model_and_inputs(arch)
    out, stats = run(model, inputs, method, options)
    plan = vtoken.build_plan(method, KEEP, **options)
    adaptive = any(getattr(st.scorer, "adaptive", False) for st in plan)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    assert len(stats.stages) == len(plan)
    for b in range(ids.shape[0]):
        pos = stats.positions[b]
        alive = set(pos[pos >= 0].tolist())
        text = [j for j in range(ids.shape[1]) if mask[b, j] and int(ids[b, j]) not in IMAGE_IDS]
        assert set(text) <= alive, "a text token was dropped"
        prev = [seg.count for seg in stats.segments[b]]
        for st, stage in zip(stats.stages, plan):
            want = [min(tokens_for(stage.keep, seg.count), p) for seg, p in zip(stats.segments[b], prev)]
            got = st.counts[b]
            if adaptive:
                assert all(1 <= g <= w for g, w in zip(got, want)), (got, want)
            else:
                assert got == want
            prev = got
    if method in ("divprune", "dart", "agile", "scope", "cdpruner", "vispruner"):
        assert "erank" in stats.stages[-1].diagnostics
    if method == "agile":
        assert "attn_entropy" in stats.stages[-1].diagnostics
    if method == "zipvl":
        assert "zipvl_count" in stats.stages[-1].diagnostics
    if method == "mustdrop":
        assert "mustdrop_merged_windows" in stats.stages[0].diagnostics
        assert "mustdrop_count" in stats.stages[-1].diagnostics
    # determinism: the same call again gives the same logits and the same kept tokens
    again, stats2 = run(model, inputs, method, options)
    assert torch.equal(out, again)
    for x, y in zip(stats.stages, stats2.stages):
        assert all(torch.equal(p, q) for p, q in zip(x.kept, y.kept))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_per_sample(arch, case):
    check_batch_equals_per_sample(arch, case, KEEP)


#: a budget between the image sizes of the Qwen image batches (16 | 8, 4 | none): sample 0 pruned,
#: sample 1 keeping both images whole, so the first stage leaves the batch as long as it was
WHOLE = 12


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ["qwen2_vl_images", "qwen3_vl_images"])
def test_batch_equals_per_sample_longest_row_kept_whole(arch, case):
    check_batch_equals_per_sample(arch, case, WHOLE)


def check_batch_equals_per_sample(arch, case, keep):
    method, options = CASES[case]
    model, inputs = model_and_inputs(arch)
    out, stats = run(model, inputs, method, options, keep)
    last = last_slot(stats, inputs)
    for b in range(inputs["input_ids"].shape[0]):
        single = slice_sample(inputs, b, model)
        one, one_stats = run(model, single, method, options, keep)
        torch.testing.assert_close(out[b, last[b]], one[0, -1], rtol=1e-4, atol=1e-4)
        if (single["input_ids"] >= IMAGE_IDS[0]).any():
            for st_b, st_1 in zip(stats.stages, one_stats.stages):
                assert torch.equal(st_b.kept[b], st_1.kept[0])
