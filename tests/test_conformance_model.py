"""Conformance of the model's own forward paths (issue 19): ``inputs_embeds`` without
``input_ids``, prebuilt 4-D and dict attention masks, attention-implementation switches after
``apply_pruning``, ``save_pretrained`` / ``from_pretrained`` and ``get_image_features`` with a
handle attached, on every adapter and pruning family (see ``tests/conformance_cases.py``).

keep-all: the plain model's outputs. Pruning: works (the documented behaviour of the path) or
raises a VTokenError that says what to do.
"""

import json
import os

import pytest
import torch

from conformance_cases import (GEN, LLAVA_NEXT_LIKE, TIGHT, apply, assert_close_nested, cases, fresh_model, one_thread,
                               reset_rope_deltas, run_case, short_known_failures)
from conftest import get_inputs, get_model

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def forward(model, call, **kw):
    reset_rope_deltas(model)
    with torch.no_grad():
        return model(**call, **kw)


# --------------------------------------------------------------------------------------- inputs_embeds
@pytest.mark.parametrize("arch,family,keep", cases("test_forward_inputs_embeds_without_ids"))
@short_known_failures
def test_forward_inputs_embeds_without_ids(arch, family, keep):
    """``model(inputs_embeds=embed(input_ids), attention_mask, pixel inputs)`` without
    ``input_ids`` (transformers finds the image positions by comparing embeddings). keep-all: the
    plain model's logits. Pruned: works or a VTokenError (vtoken finds visual tokens by id)."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    call = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        call["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
    ref = forward(model, call) if keep == "keepall" else None
    with apply(model, family, keep):
        out = run_case(keep, lambda: forward(model, call))
    if keep == "keepall":
        valid = inputs["attention_mask"].bool()
        torch.testing.assert_close(out.logits[valid], ref.logits[valid], **TIGHT)


# --------------------------------------------------------------------------------------- prebuilt masks
_CAPTURED = {}


def _prefill_call(arch, model, inputs):
    """The keyword arguments ``generate(cache_implementation="static")`` passes to the model's
    prefill forward: the 4-D (or, for Qwen2-based text models, dict) mask transformers builds from
    the 2-D one, position ids, and pixel inputs or pre-encoded features (by version). Captured on
    the plain model; the cache dropped (a plain forward), the mask's key axis cut to the prompt."""
    if arch not in _CAPTURED:
        captured = {}

        def hook(module, args, kwargs):
            if not captured:
                captured.update(kwargs)

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model.generate(**inputs, **GEN, cache_implementation="static")
        finally:
            handle.remove()
        dropped = ("cache", "past_key_values", "use_cache", "cache_position", "logits_to_keep")
        call = {k: v for k, v in captured.items() if k not in dropped}
        mask = call["attention_mask"]
        mask = mask["full_attention"] if isinstance(mask, dict) else mask
        call["attention_mask"] = mask[..., : inputs["input_ids"].shape[1]]
        _CAPTURED[arch] = call
    return dict(_CAPTURED[arch])


#: archs whose language model accepts a dict of masks by layer type (Qwen2 text models); LLaVA's
#: Llama and Qwen3-VL's text model take one mask
DICT_MASK_ARCHS = ("llava_onevision", "qwen2_vl", "qwen2_5_vl")
MASK_CASES = (cases("test_prebuilt_attention_masks", extras=("4d",))
              + cases("test_prebuilt_attention_masks", archs=DICT_MASK_ARCHS, extras=("dict",)))


@pytest.mark.parametrize("arch,family,keep,form", MASK_CASES)
@short_known_failures
def test_prebuilt_attention_masks(arch, family, keep, form):
    """A forward given the 4-D mask (or the ``{"full_attention": mask}`` dict) transformers builds
    from the 2-D one for static caches and compiled generation, with the matching position ids.
    keep-all: the plain model's logits for that call (themselves equal to the 2-D mask's at real
    tokens). Pruned: works or a VTokenError."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    call = _prefill_call(arch, model, inputs)
    if form == "dict":
        call["attention_mask"] = {"full_attention": call["attention_mask"]}
    valid = inputs["attention_mask"].bool()
    ref = forward(model, call, use_cache=False)
    torch.testing.assert_close(ref.logits[valid], forward(model, inputs).logits[valid], **TIGHT)  # the call is sound
    with apply(model, family, keep):
        out = run_case(keep, lambda: forward(model, call, use_cache=False))
    if keep == "keepall":
        torch.testing.assert_close(out.logits[valid], ref.logits[valid], **TIGHT)


# --------------------------------------------------------------------------------------- attention switch
@pytest.mark.parametrize("arch,family,keep", cases("test_switch_to_eager_after_apply"))
@short_known_failures
def test_switch_to_eager_after_apply(arch, family, keep):
    """``apply_pruning`` under SDPA, then ``model.set_attn_implementation("eager")`` and a forward
    with ``output_attentions=True``. keep-all: the plain eager model's logits and attention maps
    of every layer. Pruned: what a handle attached after the switch gives (kept positions,
    logits, attention maps)."""
    model = fresh_model(arch)
    inputs = get_inputs(arch, model)
    handle = apply(model, family, keep)
    try:
        forward(model, inputs)
        model.set_attn_implementation("eager")
        out = run_case(keep, lambda: forward(model, inputs, output_attentions=True))
        pos = handle.stats.positions.clone() if out is not None and handle.stats is not None else None
    finally:
        handle.remove()
    if out is None:
        return
    if keep == "keepall":
        ref = forward(model, inputs, output_attentions=True)
        valid = inputs["attention_mask"].bool()
    else:
        with apply(model, family, keep) as again:
            ref = forward(model, inputs, output_attentions=True)
            assert torch.equal(pos, again.stats.positions)
        valid = pos >= 0
    assert all(a is not None for a in out.attentions), "an eager layer returned no attention map"
    torch.testing.assert_close(out.logits[valid], ref.logits[valid], **TIGHT)
    assert_close_nested(out.attentions, ref.attentions, "attentions", **TIGHT)


# --------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch,family,keep", cases("test_save_and_reload_a_patched_model", families=("multi",)))
@short_known_failures
def test_save_and_reload_a_patched_model(arch, family, keep, tmp_path):
    """``save_pretrained`` while a handle is attached writes the plain model's files, byte for
    byte; ``from_pretrained`` gives a plain model (the unpatched tokens) that the same handle
    prunes exactly like the original. One family (two stages): saving reads parameters and config
    only, which no family changes."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    model.save_pretrained(tmp_path / "plain")
    with apply(model, family, keep):
        model.save_pretrained(tmp_path / "patched")
        pruned = model.generate(**inputs, **GEN)
    names = sorted(os.listdir(tmp_path / "plain"))
    assert names == sorted(os.listdir(tmp_path / "patched"))
    for name in names:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "patched" / name).read_bytes(), name
    assert "vtoken" not in json.dumps(json.loads((tmp_path / "patched" / "config.json").read_text()))
    reloaded = type(model).from_pretrained(tmp_path / "patched").eval()
    reloaded.set_attn_implementation(model.config._attn_implementation)
    assert torch.equal(reloaded.generate(**inputs, **GEN), model.generate(**inputs, **GEN))
    with apply(reloaded, family, keep):
        assert torch.equal(reloaded.generate(**inputs, **GEN), pruned)


# --------------------------------------------------------------------------------------- get_image_features
@pytest.mark.parametrize("arch,family,keep,return_dict",
                         cases("test_get_image_features", archs=LLAVA_NEXT_LIKE, families=("select",),
                               extras=(False, True, None)))
@short_known_failures
def test_get_image_features(arch, family, keep, return_dict):
    """``model.model.get_image_features(pixel_values, image_sizes, return_dict=...)`` with a handle
    attached (transformers' ``test_get_image_features_output``): the plain model's output, in the
    form asked for (a tuple for return_dict=False). The handle wraps this method on LLaVA-NeXT /
    OneVision to read per-image token counts; families differ in nothing here."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    kw = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    if return_dict is not None:
        kw["return_dict"] = return_dict
    with torch.no_grad():
        ref = model.model.get_image_features(**kw)
        with apply(model, family, keep):
            out = model.model.get_image_features(**kw)
    assert type(out) is type(ref)
    if isinstance(ref, tuple):
        assert_close_nested(list(out), list(ref), "features", **TIGHT)
    else:
        assert_close_nested(list(out.pooler_output), list(ref.pooler_output), "pooler_output", **TIGHT)
        assert_close_nested(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state", **TIGHT)
