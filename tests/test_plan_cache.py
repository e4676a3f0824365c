"""The host plan cache (vtoken.hooks.prefill_plan.PlanCache): a prefill whose input_ids, mask and
declared layout inputs were seen before reuses the plan, and gives exactly what a run without
the cache gives; anything the plan depends on changes the key."""

import pytest
import torch

import vtoken
from conftest import get_inputs, get_model
from vtoken.hooks import host_plans
from vtoken.hooks import runtime as R
from vtoken.hooks.prefill_plan import PlanCache


def _fresh(model, size, monkeypatch):
    """Runtimes built from now on use a cache of ``size`` that starts empty (the cache is the
    model's, and the test models are shared between tests)."""
    monkeypatch.setattr(R.Runtime, "plan_cache_size", size)
    host_plans.plan_cache_for(model, size).clear()


def _run(model, inputs, cache_size, monkeypatch, calls=1, method="fastv", keep=0.3):
    """Logits, kept positions and the runtime's cache of the last of ``calls`` forwards."""
    _fresh(model, cache_size, monkeypatch)
    with vtoken.apply_pruning(model, method=method, keep=keep) as handle, torch.no_grad():
        for _ in range(calls):
            out = model(**inputs).logits
            pos = [t.positions.clone() for t in handle.runtime.last_trace]
        return out, pos, handle.runtime.plans


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_cached_plan_gives_what_a_fresh_plan_gives(arch, pad_side, monkeypatch):
    model = get_model(arch)
    inputs = get_inputs(arch, model, pad_side=pad_side)
    fresh, fresh_pos, off = _run(model, inputs, 0, monkeypatch)
    again, again_pos, plans = _run(model, inputs, 4, monkeypatch, calls=3)
    assert (off.hits, off.misses, len(off.entries)) == (0, 0, 0)  # size 0: never consulted
    assert (plans.hits, plans.misses, len(plans.entries)) == (2, 1, 1)
    assert len(fresh_pos) == len(again_pos) and all(torch.equal(a, b) for a, b in zip(fresh_pos, again_pos))
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)


def test_plan_is_independent_of_pixels(monkeypatch):
    """Same prompt, other images: the plan is reused and the outputs are those of the new pixels."""
    model = get_model("llava")
    inputs = get_inputs("llava", model, pad_side="left")
    other = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))
    expected, expected_pos, _ = _run(model, other, 0, monkeypatch)
    _fresh(model, 4, monkeypatch)
    with vtoken.apply_pruning(model, method="fastv", keep=0.3) as handle, torch.no_grad():
        first = model(**inputs).logits
        got = model(**other).logits
        got_pos = [t.positions for t in handle.runtime.last_trace]
        assert handle.runtime.plans.hits == 1
    assert not torch.allclose(first, got)  # the pixels do reach the output
    assert all(torch.equal(a, b) for a, b in zip(got_pos, expected_pos))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_generate_with_cached_plan_matches_uncached(monkeypatch):
    model = get_model("qwen2_vl")
    inputs = get_inputs("qwen2_vl", model, pad_side="left")
    outs = {}
    for size in (0, 4):
        _fresh(model, size, monkeypatch)
        with vtoken.apply_pruning(model, method="fastv", keep=0.3) as handle, torch.no_grad():
            runs = [model.generate(**inputs, max_new_tokens=4, do_sample=False) for _ in range(2)]
            outs[size] = (runs, handle.runtime.plans.hits)
    assert outs[0][1] == 0 and outs[4][1] == 1
    assert all(torch.equal(a, b) for a, b in zip(outs[0][0] + outs[4][0], outs[0][0][:1] * 4))


def test_key_changes_with_everything_the_plan_depends_on():
    ids = torch.tensor([[5, 9, 9, 9, 7]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    thw = torch.tensor([[1, 2, 6]])
    base = PlanCache.key(ids, mask, {"image_grid_thw": thw}, 0.5, "cpu")
    assert base == PlanCache.key(ids.clone(), mask.clone(), {"image_grid_thw": thw.clone()}, 0.5, "cpu")
    variants = [
        PlanCache.key(torch.tensor([[5, 9, 9, 7, 7]]), mask, {"image_grid_thw": thw}, 0.5, "cpu"),  # ids
        PlanCache.key(ids, torch.tensor([[0, 1, 1, 1, 1]]).bool(), {"image_grid_thw": thw}, 0.5, "cpu"),  # mask
        PlanCache.key(ids, None, {"image_grid_thw": thw}, 0.5, "cpu"),  # no mask
        PlanCache.key(ids, mask, {"image_grid_thw": torch.tensor([[1, 6, 2]])}, 0.5, "cpu"),  # same count, other grid
        PlanCache.key(ids, mask, {"image_grid_thw": None}, 0.5, "cpu"),
        PlanCache.key(ids, mask, {"image_grid_thw": thw}, 2, "cpu"),  # budget
        PlanCache.key(ids, mask, {"image_grid_thw": thw}, 0.5, "cuda:0"),  # device
        PlanCache.key(ids.int(), mask, {"image_grid_thw": thw}, 0.5, "cpu"),  # dtype (same bytes would differ anyway)
        PlanCache.key(ids.view(5, 1), mask.view(5, 1), {"image_grid_thw": thw}, 0.5, "cpu"),  # shape, same bytes
    ]
    assert all(v != base for v in variants) and len(set(variants)) == len(variants)


def test_grid_with_same_token_count_is_a_new_plan(monkeypatch):
    """Qwen: a 4x8 and an 8x4 patch grid give the same input_ids (8 tokens after the 2x2 merge)
    but other segment grids; the second call must not reuse the first's plan."""
    import tiny_models as tm

    model = get_model("qwen2_vl")
    wide = tm.qwen_inputs(model, [[("image", (1, 4, 8))]])
    tall = tm.qwen_inputs(model, [[("image", (1, 8, 4))]])
    assert torch.equal(wide["input_ids"], tall["input_ids"])
    _fresh(model, 4, monkeypatch)
    with vtoken.apply_pruning(model, method="random", keep=0.5) as handle, torch.no_grad():
        model(**wide)
        grid_a = handle.runtime.last_meta.layout.seg_grid
        model(**tall)
        grid_b = handle.runtime.last_meta.layout.seg_grid
        assert (handle.runtime.plans.hits, handle.runtime.plans.misses) == (0, 2)
    assert grid_a == [(1, 2, 4)] and grid_b == [(1, 4, 2)]


def test_plans_outlive_a_handle_and_key_on_the_budget(monkeypatch):
    """Re-applying pruning (any method) to the same model reuses its plans; another first-stage
    budget is another plan; results equal an uncached run's."""
    model = get_model("llava")
    inputs = get_inputs("llava", model, pad_side="left")
    expected = {k: _run(model, inputs, 0, monkeypatch, method=m, keep=k)[:2] for m, k in (("fastv", 0.3), ("random", 2))}
    _fresh(model, 4, monkeypatch)
    for method, keep in (("fastv", 0.3), ("fastv", 0.3), ("fastervlm", 0.3), ("random", 2)):
        with vtoken.apply_pruning(model, method=method, keep=keep) as handle, torch.no_grad():
            out = model(**inputs).logits
            pos = [t.positions for t in handle.runtime.last_trace]
            plans = handle.runtime.plans
        if method != "fastervlm":
            torch.testing.assert_close(out, expected[keep][0], rtol=0, atol=0)
            assert all(torch.equal(a, b) for a, b in zip(pos, expected[keep][1]))
    assert (plans.hits, plans.misses, len(plans.entries)) == (2, 2, 2)


def test_least_recently_used_is_evicted():
    cache = PlanCache(size=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert (cache.hits, cache.misses) == (3, 1)
    cache.resize(1)  # keeps the most recent
    assert list(cache.entries) == ["c"]
    empty = PlanCache(size=0)
    empty.put("a", 1)
    assert empty.get("a") is None


def test_a_disabled_runtime_leaves_the_model_cache_alone(monkeypatch):
    """A handle with the cache off (size 0) between two cached ones: the cached ones still share
    their plans (the bench interleaves such handles)."""
    model = get_model("llava")
    inputs = get_inputs("llava", model, pad_side="left")
    _run(model, inputs, 4, monkeypatch)
    monkeypatch.setattr(R.Runtime, "plan_cache_size", 0)
    with vtoken.apply_pruning(model, method="fastv", keep=0.3) as handle, torch.no_grad():
        model(**inputs)
        assert handle.runtime.plans.size == 0 and not handle.runtime.plans.entries
    monkeypatch.setattr(R.Runtime, "plan_cache_size", 4)
    with vtoken.apply_pruning(model, method="fastv", keep=0.3) as handle, torch.no_grad():
        model(**inputs)
        assert (handle.runtime.plans.hits, handle.runtime.plans.misses) == (1, 1)


def test_adapter_without_declared_layout_inputs_is_not_cached(monkeypatch):
    from vtoken.adapters.llava import LlavaAdapter

    model = get_model("llava")
    inputs = get_inputs("llava", model, pad_side="left")
    monkeypatch.setattr(LlavaAdapter, "layout_inputs", None)
    _, _, plans = _run(model, inputs, 4, monkeypatch, calls=2)
    assert (plans.hits, plans.misses, len(plans.entries)) == (0, 0, 0)


def _device_tensors(prep) -> dict:
    """Every tensor a cached plan holds (its layout's and first-stage candidates' included)."""
    import dataclasses

    out = {}
    for name, obj in (("", prep), ("layout.", prep.layout), ("first.", prep.first)):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if torch.is_tensor(value):
                out[name + f.name] = value
    return out


@pytest.mark.parametrize("case", ["fastv", "sparsevlm", "pyramiddrop", "fastervlm", "visionzip", "divprune", "dart",
                                  "agile", "flowcut", "rollout", "attnflow", "var", "zipvl", "random",
                                  "uniform"])
def test_no_method_changes_a_cached_plan(case, monkeypatch):
    """Scorers and the runtime only read the cached tensors: after three forwards (one planning,
    two reusing the plan) every tensor of it is as it was planned, and the logits equal an
    uncached run's."""
    from test_scorers_e2e import CASES

    method, options = CASES[case]
    model = get_model("llava")
    inputs = get_inputs("llava", model, pad_side="left")
    kwargs = dict(method=method, keep=0.3, **options)
    _fresh(model, 0, monkeypatch)
    with vtoken.apply_pruning(model, **kwargs), torch.no_grad():
        expected = model(**inputs).logits
    made = []

    def prepare_and_snapshot(*args, **kw):
        prep = real_prepare(*args, **kw)
        made.append((prep, {k: v.clone() for k, v in _device_tensors(prep).items()}))
        return prep

    real_prepare = host_plans.prepare_prefill
    monkeypatch.setattr(host_plans, "prepare_prefill", prepare_and_snapshot)
    _fresh(model, 4, monkeypatch)
    with vtoken.apply_pruning(model, **kwargs) as handle, torch.no_grad():
        outs = [model(**inputs).logits for _ in range(3)]
        assert handle.runtime.plans.hits == 2
    ((prep, snapshot),) = made  # planned once, then reused
    for k, v in _device_tensors(prep).items():
        assert torch.equal(v, snapshot[k]), f"{case} modified the cached plan's {k}"
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
