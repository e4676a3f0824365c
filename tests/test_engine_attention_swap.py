"""vtoken.engine.attention_swap: the decode steps' private attention configs are made once per
(module, config state) and put back exactly."""

import pytest

from conftest import get_model
from vtoken.engine import attention_swap as A


@pytest.fixture
def copies(monkeypatch):
    made = []
    real = A.private_attention_config

    def counted(cfg, impl, **attrs):
        made.append(cfg)
        return real(cfg, impl, **attrs)

    monkeypatch.setattr(A, "private_attention_config", counted)
    return made


def test_private_configs_are_kept_until_the_config_changes(copies):
    modules = [layer.self_attn for layer in get_model("llava").model.language_model.layers]
    originals = [m.config for m in modules]
    assert len({id(c) for c in originals}) == 1  # the layers share one config: one private copy
    swap = A.AttentionSwap("sdpa", _marker=1)
    undo = swap.swap(modules)
    first = [m.config for m in modules]
    assert len(copies) == 1 and all(c is first[0] for c in first)
    assert all(c is not o and c._attn_implementation == "sdpa" and c._marker == 1 for c, o in zip(first, originals))
    A.AttentionSwap.restore(undo)
    assert all(m.config is o for m, o in zip(modules, originals))

    A.AttentionSwap.restore(swap.swap(modules))  # the same configs: the same copies, none made
    assert len(copies) == 1

    old = originals[0].attention_dropout  # (the layers share one config object)
    originals[0].attention_dropout = 0.25  # an attribute changed: the copies are made again
    try:
        undo = swap.swap(modules)
        assert len(copies) == 2 and all(m.config.attention_dropout == 0.25 for m in modules)
        A.AttentionSwap.restore(undo)
    finally:
        originals[0].attention_dropout = old
    assert all(m.config is o for m, o in zip(modules, originals))
    A.AttentionSwap.restore(swap.swap(modules))  # the dropout changed back: the copy made again
    assert len(copies) == 3
    new = originals[1].__class__(**originals[1].to_dict())
    modules[1].config = new  # another config object, equal attributes: module 1's copy is made again
    try:
        undo = swap.swap(modules)
        assert len(copies) == 4 and copies[-1] is new and modules[1].config is not modules[0].config
        A.AttentionSwap.restore(undo)
        assert modules[1].config is new
    finally:
        modules[1].config = originals[1]
