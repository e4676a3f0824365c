"""MergedProjections (vtoken.engine.merged_projections): one GEMM for q/k/v and one for gate/up.

Independent expectations: the model's own separate ``nn.Linear`` s (each merged output equals the
projection it replaces), the model's own forward before the merge (the same logits after it), the
parameters' storage (views of one buffer while merged, their own storage after ``restore`` /
``handle.remove()``), and transformers' own save / load round trip while merged.
"""

import pytest
import torch

import vtoken
from conftest import ARCHS, SUPPRESS, get_inputs
from vtoken.engine.merged_projections import MergedProjections


def get_model(name):
    """A model of its own (the shared test models may be merged by another test's decoder)."""
    return ARCHS[name][0]("sdpa")


def _owns_storage(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _projection_params(layers) -> list:
    out = []
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            out += [p for p in (lin.weight, lin.bias) if p is not None]
    return out


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])  # Vicuna-style (no biases), Qwen2 (q/k/v biases)
def test_merge_is_views_of_one_buffer_and_the_model_computes_the_same(name):
    model = get_model(name)
    inputs = get_inputs(name, model)
    layers = list(model.model.language_model.layers)
    params = _projection_params(layers)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        ref = model(**inputs).logits
    merged = MergedProjections(layers)
    try:
        assert merged.merge() and merged.merged == 2 * len(layers)
        a = layers[1].self_attn
        qkv_storage = a.q_proj.weight.untyped_storage().data_ptr()
        assert (a.k_proj.weight.untyped_storage().data_ptr() == qkv_storage
                == a.v_proj.weight.untyped_storage().data_ptr())
        assert not _owns_storage(a.k_proj.weight)
        assert all(torch.equal(p, b) for p, b in zip(params, before))  # the same values, the same Parameter objects
        x = torch.randn(2, 3, a.q_proj.in_features)
        for got, lin in zip(merged.qkv(1, x), (a.q_proj, a.k_proj, a.v_proj)):
            torch.testing.assert_close(got, lin(x), rtol=1e-6, atol=1e-6)
        mlp = layers[0].mlp
        for got, lin in zip(merged.gate_up(0, x), (mlp.gate_proj, mlp.up_proj)):
            torch.testing.assert_close(got, lin(x), rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, ref, rtol=1e-6, atol=1e-6)
        assert not merged.merge()  # intact: nothing to do
    finally:
        merged.restore()
    assert all(_owns_storage(p) for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_reassigned_weight_is_merged_again_and_shared_storage_is_left_alone():
    model = get_model("llava")
    layers = list(model.model.language_model.layers)
    merged = MergedProjections(layers)
    up = layers[0].mlp.up_proj
    original = up.weight
    try:
        merged.merge()
        new = torch.nn.Parameter(torch.randn_like(up.weight))
        up.weight = new  # the user replaces a weight: the merged GEMM must read the new one
        assert merged.merge()
        x = torch.randn(1, 2, up.in_features)
        torch.testing.assert_close(merged.gate_up(0, x)[1], x @ new.detach().t(), rtol=1e-5, atol=1e-5)
        assert up.weight is new and not _owns_storage(new)
        assert _owns_storage(layers[0].mlp.gate_proj.weight) is False
    finally:
        merged.restore()
        up.weight = torch.nn.Parameter(original.detach().clone())  # (the old object still views the old buffer)
    # a weight that shares its storage with another tensor (tied, or a view) is never re-pointed
    a = layers[0].self_attn
    k_original = a.k_proj.weight
    a.k_proj.weight = torch.nn.Parameter(a.q_proj.weight.detach()[: a.k_proj.out_features])
    try:
        merged = MergedProjections(layers)
        merged.merge()
        assert merged.merged == 2 * len(layers) - 1
        x = torch.randn(1, 2, a.q_proj.in_features)
        torch.testing.assert_close(merged.qkv(0, x)[1], a.k_proj(x))
        merged.restore()
    finally:
        a.k_proj.weight = k_original


def test_route_merges_and_remove_restores_and_save_pretrained_round_trips(tmp_path):
    """``compile={"fused_ops": True}`` merges at the first generate; while merged, transformers' own
    save / load round trip gives the same weights; ``handle.remove()`` gives each weight its storage back."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    layers = list(model.model.language_model.layers)
    params = _projection_params(layers)
    gen = dict(max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
        ref = model.generate(**inputs, **gen)
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1, compile={"fused_ops": True}) as handle:
        assert all(_owns_storage(p) for p in params)  # nothing merged before a call
        got = model.generate(**inputs, **gen)
        assert model.generate.route.decoder.last["merged_projections"] == 2 * len(layers)
        assert not any(_owns_storage(p) for p in params)
        handle.remove()
        model.save_pretrained(tmp_path)  # (after remove: the plain model's save)
    assert torch.equal(got, ref)
    assert all(_owns_storage(p) for p in params)
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1, compile={"fused_ops": True}):
        model.generate(**inputs, **gen)
        model.save_pretrained(tmp_path / "merged")  # while merged
    loaded = type(model).from_pretrained(tmp_path / "merged")
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_merge_projections_option():
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    from vtoken.engine import StaticDecoder

    with pytest.raises(vtoken.PruningConfigError, match="fused_ops=True"):
        StaticDecoder(model, merge_projections=True)
    dec = StaticDecoder(model, fused_ops=True, merge_projections=False)
    dec.generate(**inputs, max_new_tokens=2, suppress_tokens=SUPPRESS)
    assert dec.last["fused_ops"] and dec.last["merged_projections"] == 0
