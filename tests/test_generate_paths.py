"""``generate`` paths beyond the defaults, with a handle attached (issue 15).

Each option either behaves exactly like the unpatched model when nothing is pruned (keep=1.0)
and keeps the invariants when pruning (cached == uncached, original positions), or raises a
:class:`vtoken.VTokenError` that says what to use instead.
"""

import json
import os

import pytest
import torch

import vtoken
from conftest import SUPPRESS, get_inputs, get_model
from tiny_models import IMAGE_ID
from vtoken.adapters.base import token_runs
from vtoken.errors import PruningConfigError, UnsupportedCallError

GEN = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS)


def _assert_same(a, b, what=""):
    """Nested tuples of tensors: same structure, shapes and values."""
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{what}[{i}]")
        return
    assert a.shape == b.shape, what
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("arch,attn", [("llava", "eager"), ("qwen2_vl", "sdpa")])
def test_keep_all_without_cache_returns_the_unpatched_outputs(arch, attn):
    """No-cache generation replays the prompt's decisions; a stage that dropped nothing replays as
    nothing (the model's own layout and masks): hidden states of every slot, padding rows
    included, scores and tokens equal the unpatched model's."""
    model = get_model(arch, attn=attn)
    inputs = get_inputs(arch, model)
    kw = dict(GEN, use_cache=False, return_dict_in_generate=True, output_hidden_states=True, output_scores=True)
    ref = model.generate(**inputs, **kw)
    with vtoken.apply_pruning(model, method="fastv", keep=1.0, K=1):
        out = model.generate(**inputs, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    _assert_same(out.scores, ref.scores, "scores")
    _assert_same(out.hidden_states, ref.hidden_states, "hidden_states")


def _kept(handle):
    return [k.tolist() for k in handle.stats.stages[0].kept]


@pytest.mark.parametrize("kw", [dict(num_beams=2), dict(do_sample=True, top_k=5, num_return_sequences=2)],
                         ids=["beams", "return_sequences"])
def test_vision_encoder_scorer_with_expanded_batches(kw):
    """transformers >= 5.2x encodes the images once and repeats their features for beams /
    return sequences: the vision-encoder captures follow (each repeated row ranks its own image
    with its own encoder attention), instead of a mismatch error."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    kw = {**GEN, **kw}
    torch.manual_seed(0)
    ref = model.generate(**inputs, **kw)
    with vtoken.apply_pruning(model, method="fastervlm", keep=1.0):
        torch.manual_seed(0)
        assert torch.equal(model.generate(**inputs, **kw), ref)
    with vtoken.apply_pruning(model, method="fastervlm", keep=8) as h:
        model.generate(**inputs, **GEN)
        single = _kept(h)
        torch.manual_seed(0)
        a = model.generate(**inputs, **kw)
        expanded = _kept(h)
        torch.manual_seed(0)
        b = model.generate(**inputs, **kw, use_cache=False)
    assert torch.equal(a, b)
    # each repeated row keeps what its sample keeps alone; transformers < 5.2x expands a
    # multi-image sample's pixels image by image (its own rows then see other features): there,
    # samples with at most one image only
    n_images = [len(token_runs(row == IMAGE_ID)) for row in inputs["input_ids"]]
    in_order = hasattr(model, "_expand_multimodal_outputs")
    for row, kept in enumerate(expanded):
        if in_order or n_images[row // 2] <= 1:
            assert kept == single[row // 2], row


def test_vision_encoder_scorer_keeps_video_whole_or_refuses():
    """FasterVLM ranks images by encoder attention; a video segment (not mapped to encoder
    patches) may come only with a budget that keeps it whole: keep=1.0 equals the unpatched
    model on a batch with a video, a budget that would rank the video is refused clearly."""
    model = get_model("qwen2_vl")
    inputs = get_inputs("qwen2_vl", model)
    ref = model.generate(**inputs, **GEN)
    with vtoken.apply_pruning(model, method="fastervlm", keep=1.0):
        assert torch.equal(model.generate(**inputs, **GEN), ref)
    with vtoken.apply_pruning(model, method="fastervlm", keep=4):
        with pytest.raises(PruningConfigError, match="images only.*use an LLM-side method"):
            model.generate(**inputs, **GEN)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_static_cache_equal_at_keep_all_and_pruned(arch):
    """``cache_implementation="static"``: with nothing to drop the patched model runs as the plain
    one; with tokens to drop it generates what the default (dynamic-cache) path generates (more in
    tests/test_static_cache_generate.py)."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    ref = model.generate(**inputs, **GEN, cache_implementation="static")
    with vtoken.apply_pruning(model, method="fastv", keep=1.0, K=1):
        assert torch.equal(model.generate(**inputs, **GEN, cache_implementation="static"), ref)
    with vtoken.apply_pruning(model, method="fastv", keep=8, K=1):
        assert torch.equal(model.generate(**inputs, **GEN, cache_implementation="static"),
                           model.generate(**inputs, **GEN))


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_inputs_embeds_with_pixels_prunes_like_input_ids(arch):
    """``inputs_embeds`` with pixel inputs and no ``input_ids`` (issue 19): the visual tokens are
    found where the embeddings are the placeholder's, as transformers finds them. Keep-all equals
    the plain model on the same call; pruning keeps each image's budget. LLaVA's forward is the
    same function of embeddings as of ids, so it prunes exactly the tokens ``input_ids`` would
    (Qwen computes its M-RoPE positions from ``input_ids`` when given: another forward)."""
    model = get_model(arch)
    inputs = dict(get_inputs(arch, model))
    ids = inputs.pop("input_ids")
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        plain = model(inputs_embeds=embeds, **inputs).logits
        with vtoken.apply_pruning(model, method="fastv", keep=1.0, K=1):
            torch.testing.assert_close(model(inputs_embeds=embeds, **inputs).logits, plain, rtol=0, atol=0)
        with vtoken.apply_pruning(model, method="fastv", keep=0.5, K=1) as h:
            ref = model(input_ids=ids, **inputs).logits
            kept_ref = _kept(h)
            got = model(inputs_embeds=embeds, **inputs).logits
            kept = _kept(h)
    assert [len(k) for k in kept] == [len(k) for k in kept_ref] and any(kept)
    if arch == "llava":
        assert kept == kept_ref
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_torch_compile_forward_and_compiled_module():
    """``model.forward = torch.compile(model.forward)`` and ``apply_pruning(torch.compile(model))``:
    the hooks run eagerly (graph breaks), so keep-all equals the plain model and pruning equals
    uncompiled pruning (LLaVA-NeXT: its layout is read from the forward's features)."""
    import torch._dynamo

    model = get_model("llava_next")
    inputs = get_inputs("llava_next", model)
    ref = model.generate(**inputs, **GEN)
    with vtoken.apply_pruning(model, method="fastv", keep=8, K=1):
        pruned = model.generate(**inputs, **GEN)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager")
    try:
        for keep, want in ((1.0, ref), (8, pruned)):
            with vtoken.apply_pruning(model, method="fastv", keep=keep, K=1):
                assert torch.equal(model.generate(**inputs, **GEN), want)
    finally:
        model.__dict__.pop("forward", None)
        torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with vtoken.apply_pruning(compiled, method="fastv", keep=8, K=1) as h:
        assert h.model is model
        assert torch.equal(compiled.generate(**inputs, **GEN), pruned)
    assert "_vtoken_handle" not in model.__dict__
    torch._dynamo.reset()


def _extended(inputs, seq, pixels):
    """Inputs of a longer sequence (a continuation): mask and mm_token_type_ids extended."""
    n = seq.shape[1] - inputs["input_ids"].shape[1]
    kw = {k: v for k, v in inputs.items() if k != "input_ids" and (pixels or not k.startswith("pixel_values"))}
    B = seq.shape[0]
    kw["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(B, n, dtype=torch.long)], 1)
    if "mm_token_type_ids" in kw:
        kw["mm_token_type_ids"] = torch.cat([kw["mm_token_type_ids"], torch.zeros(B, n, dtype=torch.long)], 1)
    return dict(input_ids=seq, **kw)


def test_cache_continuation_keeps_original_positions():
    """Multi-turn: generate, append a user turn, continue from the returned cache. keep-all equals
    the unpatched model; pruned, it equals a fresh prompt of the whole conversation pruned to the
    same kept set (the cache holds the pruned prefix, positions count from the unpruned length)."""
    from vtoken import Stage
    from vtoken.scorers.base import Scorer

    class Fixed(Scorer):
        name = "fixed_test"

        def __init__(self, kept):
            self.kept = kept

        def score(self, sig):
            return torch.tensor([[float(i in self.kept[s]) for i in row] for s, row in enumerate(sig.index.tolist())])

    arch = "qwen2_vl"  # M-RoPE: positions continue from rope_deltas
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    turn = torch.randint(1, 80, (inputs["input_ids"].shape[0], 3), generator=torch.Generator().manual_seed(1))

    def conversation():
        first = model.generate(**inputs, **GEN, return_dict_in_generate=True)
        seq = torch.cat([first.sequences, turn], 1)
        return model.generate(**_extended(inputs, seq, pixels=False), past_key_values=first.past_key_values, **GEN), seq

    ref, _ = conversation()
    with vtoken.apply_pruning(model, method="fastv", keep=1.0, K=1):
        assert torch.equal(conversation()[0], ref)
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1) as h:
        out, seq = conversation()
        trace = h.runtime.last_trace[0]
    kept = [set(trace.seg_index[s][trace.seg_keep[s]].tolist()) for s in range(trace.seg_index.shape[0])]
    with vtoken.apply_pruning(model, plan=[Stage(layer=1, scorer=Fixed(kept), keep=4)]):
        fresh = model.generate(**_extended(inputs, seq, pixels=True), **GEN)
    assert torch.equal(out, fresh)


def test_save_pretrained_of_a_patched_model_is_the_plain_checkpoint(tmp_path):
    """Saving while a handle is attached writes exactly the plain model's files (no vtoken state in
    the config), and the reloaded model works without vtoken."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    model.save_pretrained(tmp_path / "plain")
    with vtoken.apply_pruning(model, method="fastv", keep=8, K=1):
        model.save_pretrained(tmp_path / "patched")
    plain, patched = sorted(os.listdir(tmp_path / "plain")), sorted(os.listdir(tmp_path / "patched"))
    assert plain == patched
    for name in plain:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "patched" / name).read_bytes(), name
    assert "vtoken" not in json.dumps(json.loads((tmp_path / "patched" / "config.json").read_text()))
    reloaded = type(model).from_pretrained(tmp_path / "patched").eval()
    reloaded.set_attn_implementation(model.config._attn_implementation)
    assert torch.equal(reloaded.generate(**inputs, **GEN), model.generate(**inputs, **GEN))


def test_output_attentions_and_hidden_states_follow_the_pruned_layout():
    """With pruning, the prefill's per-layer outputs cover the full prompt before the stage's layer
    and the kept tokens from it on (``handle.stats.positions`` maps them); a decode step attends
    to the pruned cache plus the generated tokens."""
    model = get_model("llava", attn="eager")
    inputs = get_inputs("llava", model)
    kw = dict(GEN, return_dict_in_generate=True, output_attentions=True, output_hidden_states=True)
    with vtoken.apply_pruning(model, method="fastv", keep=8, K=1) as h:
        out = model.generate(**inputs, **kw)
        kept = h.stats.positions.shape[1]
    N = inputs["input_ids"].shape[1]
    assert [a.shape[-1] for a in out.attentions[0]] == [N, kept, kept, kept]
    assert [x.shape[1] for x in out.hidden_states[0]] == [N, N, kept, kept, kept]
    assert [a.shape[-1] for a in out.attentions[1]] == [N + 1, kept + 1, kept + 1, kept + 1]


def test_assisted_decoding_keeps_the_pruned_cache_in_step():
    """Prompt lookup and assistant models verify several candidate tokens per step and crop the
    rejected ones from the cache (with an assistant, the prompt's forward itself ends with
    candidates): the pruned prefix's record follows the crop, so assisted decoding returns what
    greedy decoding returns (keep-all: the unpatched model's tokens). A text-guided method, whose
    ranking would read the appended candidates, is refused with an assistant."""
    import tiny_models as tm

    model = get_model("qwen2_vl")
    inputs = get_inputs("qwen2_vl", model, variant="single")
    assistant = tm.tiny_qwen("qwen2_vl", seed=1)
    gen = dict(GEN, max_new_tokens=6, min_new_tokens=6)
    ref = model.generate(**inputs, **gen)
    for method, keep, opts in (("fastv", 1.0, {"K": 1}), ("fastv", 8, {"K": 1}), ("divprune", 8, {})):
        with vtoken.apply_pruning(model, method=method, keep=keep, **opts):
            greedy = model.generate(**inputs, **gen)
            if keep == 1.0:
                assert torch.equal(greedy, ref)
            assert torch.equal(model.generate(**inputs, **gen, prompt_lookup_num_tokens=3), greedy)
            if method == "fastv" and keep != 1.0:
                with pytest.raises(UnsupportedCallError, match="assisted decoding.*without one"):
                    model.generate(**inputs, **gen, assistant_model=assistant)
            else:
                assert torch.equal(model.generate(**inputs, **gen, assistant_model=assistant), greedy)


def test_pruned_cache_is_not_continued_without_its_handle():
    """A cache whose prompt was pruned has shorter layers: continuing it after ``handle.remove()``
    (plain model, or another handle) is refused clearly instead of failing inside attention; a
    keep-all cache is a plain cache and continues as one."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    B = inputs["input_ids"].shape[0]

    def continued(first):
        mask = torch.cat([inputs["attention_mask"], torch.ones(B, 3, dtype=torch.long)], 1)
        return model.generate(input_ids=first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
                              **GEN)

    ref = continued(model.generate(**inputs, **GEN, return_dict_in_generate=True))
    with vtoken.apply_pruning(model, method="fastv", keep=1.0, K=1):
        first = model.generate(**inputs, **GEN, return_dict_in_generate=True)
    assert torch.equal(continued(first), ref)
    with vtoken.apply_pruning(model, method="fastv", keep=8, K=1):
        first = model.generate(**inputs, **GEN, return_dict_in_generate=True)
    with pytest.raises(UnsupportedCallError, match="handle attached"):
        continued(first)
    with vtoken.apply_pruning(model, method="fastv", keep=8, K=1):
        with pytest.raises(UnsupportedCallError, match="handle attached"):
            continued(first)


def test_generate_lays_out_with_the_grid_transformers_drops():
    """transformers >= 5.2x encodes the images in ``generate`` and drops ``image_grid_thw`` before the
    first forward; the layout still gets each image's grid (from the generate call), so a grid-reading
    scorer keeps in ``generate`` what it keeps in a plain forward."""
    model = get_model("qwen2_vl")
    inputs = get_inputs("qwen2_vl", model)
    with vtoken.apply_pruning(model, method="uniform", keep=4) as h:
        with torch.no_grad():
            model(**inputs)
        forward = [k.tolist() for k in h.stats.stages[0].kept]
        model.generate(**inputs, max_new_tokens=1, do_sample=False, suppress_tokens=SUPPRESS)
        generated = [k.tolist() for k in h.stats.stages[0].kept]
    assert generated == forward
