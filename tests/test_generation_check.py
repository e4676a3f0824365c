"""transformers' per-call legacy-generation-parameters check, answered once per configuration state
(``vtoken.hooks.generation_check``): the same answers and refusals as the plain model, transformers'
own check run once per state instead of on every call, nothing left on the config."""

import pytest
import torch

import vtoken
from conftest import SUPPRESS, get_inputs, get_model
from vtoken.hooks import generation_check
from vtoken.hooks.generation_check import cached_generation_check


@pytest.fixture
def slow_check(monkeypatch):
    """Every check counts as slow (transformers 5.17's is; 5.25's is already cheap and left alone)."""
    monkeypatch.setattr(generation_check, "SLOW_CHECK_S", 0.0)
    monkeypatch.setattr(generation_check, "_FAST_CLASSES", set())
    monkeypatch.setattr(generation_check, "_RESULTS", {})


def _counting(monkeypatch, config):
    calls = []
    original = type(config)._get_generation_parameters

    def counted(self):
        calls.append(1)
        return original(self)
    monkeypatch.setattr(type(config), "_get_generation_parameters", counted)
    return calls


@pytest.mark.parametrize("compile", [False, True])
def test_the_check_runs_once_per_state_and_still_refuses_a_legacy_config(monkeypatch, slow_check, compile):
    model = get_model("llava")
    inputs = get_inputs("llava", model, variant="single")
    ref = model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=SUPPRESS)
    calls = _counting(monkeypatch, model.config)
    with vtoken.apply_pruning(model, method="fastv", keep=1.0, compile=compile):
        for _ in range(3):
            got = model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=SUPPRESS)
            assert torch.equal(got, ref)
        assert len(calls) <= 1  # transformers' own check: once for this state (every call before)
        assert "_get_generation_parameters" not in vars(model.config)
        # the legacy usage the check exists for: refused as the plain model refuses it, every time
        monkeypatch.setattr(model.config, "temperature", 0.3, raising=False)
        for _ in range(2):
            with pytest.raises(ValueError, match="modified the pretrained model configuration"):
                model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=SUPPRESS)
        assert "_get_generation_parameters" not in vars(model.config)
    monkeypatch.undo()
    # the reference: the plain model (no handle) refuses the same configuration
    monkeypatch.setattr(model.config, "temperature", 0.3, raising=False)
    with pytest.raises(ValueError, match="modified the pretrained model configuration"):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=SUPPRESS)


def test_a_check_that_is_already_cheap_is_left_as_transformers_has_it(monkeypatch):
    monkeypatch.setattr(generation_check, "SLOW_CHECK_S", 3600.0)  # every check counts as cheap
    monkeypatch.setattr(generation_check, "_FAST_CLASSES", set())
    monkeypatch.setattr(generation_check, "_RESULTS", {})
    config = get_model("llava").config
    calls = _counting(monkeypatch, config)
    for _ in range(3):
        with cached_generation_check(config):
            assert config._get_generation_parameters() == {}
    assert len(calls) == 3  # the first call measured it; the next two went to transformers' own check
    assert "_get_generation_parameters" not in vars(config)


def test_answers_equal_transformers_check_for_each_state(slow_check):
    config = get_model("llava").config
    plain = type(config)._get_generation_parameters
    with cached_generation_check(config):
        assert config._get_generation_parameters() == plain(config) == {}
        object.__setattr__(config, "top_k", 7)  # (bypassing the config's own setattr, as a legacy edit would not)
        try:
            assert config._get_generation_parameters() == plain(config) == {"top_k": 7}
        finally:
            vars(config).pop("top_k", None)
        assert config._get_generation_parameters() == plain(config) == {}
    assert "_get_generation_parameters" not in vars(config)
