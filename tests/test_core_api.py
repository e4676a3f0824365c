"""API, errors, removal, FastV against an independent eager computation."""

import os

import pytest
import torch

import vtoken
from conftest import get_inputs, get_model
from tiny_models import IMAGE_ID, llava_inputs, pad, tiny_llava


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("bad", [0, -3, 1.5, 0.0, -0.2, "64", None, True, [64], float("nan")])
def test_bad_keep_is_a_clear_error(bad):
    model = get_model("llava")
    with pytest.raises(vtoken.PruningConfigError, match="keep"):
        vtoken.apply_pruning(model, method="fastv", keep=bad)
    assert "_vtoken_handle" not in model.__dict__


def test_unknown_method_lists_known_ones():
    with pytest.raises(vtoken.PruningConfigError) as err:
        vtoken.apply_pruning(get_model("llava"), method="fastv2", keep=8)
    for name in ("fastv", "random", "uniform", "none"):
        assert name in str(err.value)


def test_unsupported_model_names_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(vtoken.UnsupportedModelError) as err:
        vtoken.apply_pruning(model, method="fastv", keep=8)
    assert "LlamaForCausalLM" in str(err.value) and "Qwen2VLForConditionalGeneration" in str(err.value)


def test_bad_option_and_layer_errors():
    model = get_model("llava")
    with pytest.raises(vtoken.PruningConfigError, match="option"):
        vtoken.apply_pruning(model, method="fastv", keep=8, bogus=1)
    with pytest.raises(vtoken.PruningConfigError, match="outside"):
        vtoken.apply_pruning(model, method="fastv", keep=8, K=99)
    with pytest.raises(vtoken.PruningConfigError, match="layer 0"):
        vtoken.apply_pruning(model, method="fastv", keep=8, K=0)
    with pytest.raises(vtoken.PruningConfigError, match="increasing"):
        vtoken.apply_pruning(model, plan=[vtoken.Stage(2, "random", 8), vtoken.Stage(1, "random", 4)])
    assert "_vtoken_handle" not in model.__dict__


def test_already_pruned_is_a_clear_error():
    model = get_model("llava")
    with vtoken.apply_pruning(model, method="random", keep=8):
        with pytest.raises(vtoken.AlreadyPrunedError, match="remove"):
            vtoken.apply_pruning(model, method="fastv", keep=8)
    vtoken.apply_pruning(model, method="fastv", keep=8).remove()  # fine after removal


def test_remove_restores_bit_identical_outputs(arch):
    fresh = get_model(arch)
    inputs = get_inputs(arch, fresh)
    before = logits(fresh, inputs)
    gen_before = fresh.generate(**inputs, max_new_tokens=3, do_sample=False)
    h = vtoken.apply_pruning(fresh, method="fastv", keep=4)
    pruned = logits(fresh, inputs)
    fresh.generate(**inputs, max_new_tokens=3, do_sample=False)
    h.remove()
    assert pruned.shape[1] < before.shape[1]
    assert torch.equal(logits(fresh, inputs), before)
    assert torch.equal(fresh.generate(**inputs, max_new_tokens=3, do_sample=False), gen_before)
    assert "generate" not in fresh.__dict__ and "_vtoken_handle" not in fresh.__dict__
    for layer in fresh.model.language_model.layers:
        assert not layer._forward_pre_hooks and "_vtoken_probe" not in layer.self_attn.__dict__
        assert layer.self_attn.config is fresh.model.language_model.config


def test_inputs_without_images_pass_through(arch):
    model = get_model(arch)
    ids, mask = pad([[5, 6, 7, 8, 9], [3, 4, 5]], "left")
    inputs = dict(input_ids=ids, attention_mask=mask)
    ref = logits(model, inputs)
    with vtoken.apply_pruning(model, method="fastv", keep=4) as h:
        out = logits(model, inputs)
        assert h.stats is None
    assert torch.equal(out, ref)


def test_integer_budget_above_image_keeps_it_whole():
    model = get_model("llava")
    inputs = llava_inputs(model, [3], [1], [3])
    ref = logits(model, inputs)
    with vtoken.apply_pruning(model, method="fastv", keep=10_000) as h:
        out = logits(model, inputs)
        assert h.stats.stages[0].counts == [[36]]
    torch.testing.assert_close(out, ref)


def test_fraction_budget_rounds_per_image():
    model = get_model("llava")
    inputs = llava_inputs(model, [3, 2], [2, 1], [3, 2])
    with vtoken.apply_pruning(model, method="uniform", keep=0.25) as h:
        logits(model, inputs)
    assert h.stats.stages[0].counts == [[9, 9], [9]]  # round(0.25 * 36)


def test_available_methods_and_handle_repr():
    assert {"fastv", "random", "uniform", "none"} <= set(vtoken.available_methods())
    with vtoken.apply_pruning(get_model("llava"), method="fastv", keep=8) as h:
        assert "fastv" in repr(h)


@pytest.mark.parametrize("arch_name", ["llava", "qwen2_vl"])
def test_fastv_matches_independent_eager_last_token_attention(arch_name):
    """FastV's kept set == top-k of head-averaged attention from the last token at layer K-1,
    read from an unpatched eager run with output_attentions=True."""
    K, keep = 2, 5
    model = get_model(arch_name, attn="eager")
    inputs = get_inputs(arch_name, model)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    att = out.attentions[K - 1]  # (B, H, N, N)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    with vtoken.apply_pruning(model, method="fastv", keep=keep, K=K) as h:
        logits(model, inputs)
        stats = h.stats
    for b in range(ids.shape[0]):
        last = int(torch.where(mask[b], torch.arange(ids.shape[1]), -1).max())
        score = att[b, :, last].mean(0)
        visual = torch.nonzero((ids[b] == 90) | (ids[b] == 91)).flatten()
        expected = []
        for seg in stats.segments[b]:
            cols = visual[seg.offset: seg.offset + seg.length]
            top = torch.topk(score[cols], min(keep, seg.count)).indices
            expected += (seg.offset + top).tolist()
        assert sorted(expected) == stats.stages[0].kept[b].tolist()


def test_scoring_keeps_sdpa_for_all_layers():
    """The model keeps its attention implementation; only the probed layer routes through
    vtoken's wrapper, which calls the same SDPA function."""
    model = get_model("llava")
    with vtoken.apply_pruning(model, method="fastv", keep=8, K=2):
        impls = [layer.self_attn.config._attn_implementation for layer in model.model.language_model.layers]
    assert impls == ["sdpa", "vtoken", "sdpa", "sdpa"]
    assert model.model.language_model.config._attn_implementation == "sdpa"


def test_two_models_do_not_interfere():
    a, b = tiny_llava(seed=1), tiny_llava(seed=2)
    inputs = llava_inputs(a, [3], [1], [3])
    ref_b = logits(b, inputs)
    with vtoken.apply_pruning(a, method="random", keep=4):
        logits(a, inputs)
        assert torch.equal(logits(b, inputs), ref_b)


def test_multi_stage_plan_and_equivalent_tokens():
    model = get_model("llava")
    inputs = llava_inputs(model, [3], [1], [3])
    plan = [vtoken.Stage(0, "random", 24), vtoken.Stage(2, "fastv", 8)]
    with vtoken.apply_pruning(model, plan=plan) as h:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        s = h.stats
    assert [st.counts[0] for st in s.stages] == [[24], [8]]
    assert set(s.stages[1].kept[0].tolist()) <= set(s.stages[0].kept[0].tolist())
    assert s.equivalent_tokens[0] == pytest.approx((2 * 24 + 2 * 8) / 4)


def test_merge_mode_changes_kept_states_not_counts():
    model = get_model("llava")
    inputs = llava_inputs(model, [3], [1], [3])
    with vtoken.apply_pruning(model, method="fastv", keep=6) as h:
        sel = logits(model, inputs)
        kept_sel = h.stats.stages[0].kept[0]
    with vtoken.apply_pruning(model, method="fastv", keep=6, mode="merge") as h:
        mer = logits(model, inputs)
        kept_mer = h.stats.stages[0].kept[0]
    assert torch.equal(kept_sel, kept_mer) and sel.shape == mer.shape
    assert not torch.allclose(sel, mer)


@pytest.mark.parametrize("arch_name", ["llava", "qwen2_vl"])
def test_fused_kernel_path_gives_the_same_pruning(arch_name):
    """backend="triton" routes the scoring layer through vtoken.kernels.attend_and_score (its
    output AND the scores); kept sets and logits match the PyTorch path (CPU: Triton interpreter)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    model = get_model(arch_name)
    inputs = get_inputs(arch_name, model)
    results = {}
    for backend in ("torch", "triton"):
        with vtoken.apply_pruning(model, method="fastv", keep=5, backend=backend) as h:
            out = logits(model, inputs)
            results[backend] = (out, [k.tolist() for k in h.stats.stages[0].kept])
    assert results["torch"][1] == results["triton"][1]
    torch.testing.assert_close(results["torch"][0], results["triton"][0], rtol=1e-4, atol=1e-4)


def test_fastervlm_reads_cls_attention_of_the_feature_layer():
    """FasterVLM's kept set == top-k of head-averaged [CLS]->patch attention of the vision layer
    that produces LLaVA's features (vision_feature_layer=-2), from an eager encoder run."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    tower = model.model.vision_tower
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            enc = tower(inputs["pixel_values"], output_attentions=True)
    finally:
        tower.config._attn_implementation = impl
    layer_attn = enc.attentions[len(enc.attentions) - 2]  # the layer whose output is hidden_states[-2]
    cls = layer_attn[:, :, 0, 1:].mean(1)  # (images, 36)
    keep = 7
    with vtoken.apply_pruning(model, method="fastervlm", keep=keep) as h:
        logits(model, inputs)
        stats = h.stats
    image = 0
    for b, segs in enumerate(stats.segments):
        expected = []
        for seg in segs:
            expected += (seg.offset + torch.topk(cls[image], keep).indices).tolist()
            image += 1
        assert sorted(expected) == stats.stages[0].kept[b].tolist()
