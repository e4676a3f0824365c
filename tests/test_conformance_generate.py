"""Conformance of ``generate`` (issue 19): every generation mode, output option, cache class,
continuation, assisted decoding, ``inputs_embeds`` form, padding side and batch shape, on every
adapter and pruning family (see ``tests/conformance_cases.py`` for the handles and the known
failures).

keep-all ("keepall" cases): the result equals the plain model's — same tokens, and scores,
logits, hidden states equal to a tight tolerance. Pruning ("pruned" cases): the call works and
keeps the invariants (cached == uncached; an alternative path == the method's default dynamic-cache
path), or raises a VTokenError that says what to do.

Modes no longer in transformers' ``generate`` (contrastive search, DoLa, group and constrained
beam search moved to Hub ``custom_generate`` repositories in transformers 5, which no test here can
download) are not exercised.
"""

import pytest
import torch
import transformers

from conformance_cases import (GEN, LLAVA_FAMILY, LOOSE, TIGHT, apply, assert_close_nested, assert_same_generation,
                               assert_same_tokens, cases, fresh_model, one_thread, reset_rope_deltas, run_case,
                               short_known_failures, works_or_refuses)
from conftest import SUPPRESS, get_inputs, get_model
from tiny_models import IMAGE_ID

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

_PLAIN = {}


def plain(key, fn):
    """The plain model's result of ``fn()``, computed once per key (the models are deterministic)."""
    if key not in _PLAIN:
        _PLAIN[key] = fn()
    return _PLAIN[key]


def keep_all_generates_as_plain(key, run, model, family):
    """``run()`` with a keep-all handle of ``family`` gives the plain model's generation."""
    ref = plain(key, run)
    with apply(model, family, "keepall"):
        out = run()
    assert_same_generation(out, ref, **TIGHT)


def generate(model, inputs, seed=0, **kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, **kw)


# --------------------------------------------------------------------------------------- modes
OUT = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)
SAMPLE = dict(max_new_tokens=3, min_new_tokens=3, do_sample=True, top_k=5, suppress_tokens=SUPPRESS)
MODES = {
    "greedy": dict(GEN, **OUT, output_hidden_states=True),
    "sample": dict(SAMPLE, **OUT),
    "beams": dict(GEN, num_beams=2, **OUT),
    "beam_sample": dict(SAMPLE, num_beams=2, **OUT),
    "return_sequences": dict(SAMPLE, num_return_sequences=2, **OUT),
}


def _beams_not_comparable(arch, model, inputs, mode, kw):
    """Why beam search with and without cache cannot be compared here (None: it can), run on the
    plain model. Compared where transformers itself keeps them equal:

    * transformers < 5.2x expands a multi-image sample's pixels image by image for beams (no
      ``_expand_multimodal_outputs``): on LLaVA-family models the beams of one sample then see
      different images (the plain model's output is wrong as well), and beam reordering between
      steps swaps rows whose pruning differs;
    * transformers 5.17's beam search itself differs with and without cache on some of these
      models: the plain model must agree first."""
    if mode not in ("beams", "beam_sample"):
        return None
    if arch in LLAVA_FAMILY and not hasattr(model, "_expand_multimodal_outputs"):
        return (f"transformers {transformers.__version__} expands a multi-image sample's pixels image by image for "
                f"{mode}: its beams see different images; compared on transformers >= 5.2x")
    agree = plain((arch, mode, "cache==no-cache"), lambda: torch.equal(
        generate(model, inputs, **kw).sequences, generate(model, inputs, **kw, use_cache=False).sequences))
    if not agree:
        return (f"transformers {transformers.__version__}: the plain model's {mode} differs with and without cache "
                f"on {arch}; the pruned comparison applies where the plain one holds")
    return None


@pytest.mark.parametrize("arch,family,keep,mode", cases("test_generate_modes", extras=tuple(MODES)))
@short_known_failures
def test_generate_modes(arch, family, keep, mode):
    """Greedy (with scores, logits, hidden states), seeded sampling, beam search, beam sampling and
    num_return_sequences. keep-all: the plain model's outputs. Pruned: with the KV cache ==
    without it (tokens, scores and logits; beams where transformers itself allows the comparison,
    see _beams_not_comparable)."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    kw = MODES[mode]
    if keep == "keepall":
        ref = plain((arch, mode), lambda: generate(model, inputs, **kw))
        with apply(model, family, keep):
            out = generate(model, inputs, **kw)
        assert_same_generation(out, ref, **TIGHT)
        return
    no_cache = dict(kw, output_hidden_states=False)
    not_comparable = _beams_not_comparable(arch, model, inputs, mode, no_cache)
    with apply(model, family, keep):
        cached = works_or_refuses(lambda: generate(model, inputs, **kw))
        if cached is None:
            return
        if not_comparable:  # it ran; the comparison does not apply on this version
            pytest.skip(not_comparable)
        uncached = generate(model, inputs, **no_cache, use_cache=False)
    assert_same_tokens(cached.sequences, uncached.sequences, "cache", "no cache")
    assert_close_nested(cached.scores, uncached.scores, "scores", **LOOSE)
    assert_close_nested(cached.logits, uncached.logits, "logits", **LOOSE)


@pytest.mark.parametrize("arch,family,keep", cases("test_output_attentions"))
@short_known_failures
def test_output_attentions(arch, family, keep):
    """``output_attentions=True`` on an eager model: keep-all returns the plain model's attention
    maps of every step and layer; pruned, the maps of the prompt's layers after a stage cover the
    kept tokens (their last axis), the call works with and without cache alike."""
    model = get_model(arch, attn="eager")
    inputs = get_inputs(arch, model)
    kw = dict(GEN, return_dict_in_generate=True, output_scores=True, output_attentions=True)
    if keep == "keepall":
        ref = plain((arch, "attentions"), lambda: generate(model, inputs, **kw))
        with apply(model, family, keep):
            out = generate(model, inputs, **kw)
        assert_same_generation(out, ref, **TIGHT)
        return
    with apply(model, family, keep) as handle:
        out = works_or_refuses(lambda: generate(model, inputs, **kw))
        if out is None:
            return
        kept = handle.stats.positions.shape[1]
        uncached = generate(model, inputs, **dict(kw, output_attentions=False), use_cache=False)
    assert_same_tokens(out.sequences, uncached.sequences, "cache", "no cache")
    assert_close_nested(out.scores, uncached.scores, "scores", **LOOSE)
    first = [a.shape[-1] for a in out.attentions[0]]
    assert first[-1] == kept and all(a is not None for a in out.attentions[0]), first


# --------------------------------------------------------------------------------------- caches
def _dynamic_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


CACHES = ("dynamic_explicit", "static", "no_cache")


@pytest.mark.parametrize("arch,family,keep,cache", cases("test_cache_classes", extras=CACHES))
@short_known_failures
def test_cache_classes(arch, family, keep, cache):
    """A DynamicCache passed as ``past_key_values``, ``cache_implementation="static"`` and
    ``use_cache=False``. keep-all: the plain model's tokens and scores with the same cache option.
    Pruned: the same tokens and scores as the method's default (dynamic-cache) path, or a
    VTokenError (a static cache cannot hold a pruned layer)."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    kw = dict(GEN, return_dict_in_generate=True, output_scores=True)

    def run():
        if cache == "dynamic_explicit":
            return generate(model, inputs, **kw, past_key_values=_dynamic_cache(model))
        if cache == "static":
            return generate(model, inputs, **kw, cache_implementation="static")
        return generate(model, inputs, **kw, use_cache=False)

    if keep == "keepall":
        keep_all_generates_as_plain((arch, "cache", cache), run, model, family)
        return
    with apply(model, family, keep):
        default = generate(model, inputs, **kw)
        out = works_or_refuses(run)
    if out is not None:
        assert_same_generation(out, default, **LOOSE)


def _continued(inputs, sequences):
    """Inputs continuing ``sequences`` (the prompt + generated tokens): mask and mm_token_type_ids
    extended; no pixel inputs (the cache holds the prompt's images)."""
    B, n = sequences.shape[0], sequences.shape[1] - inputs["input_ids"].shape[1]
    out = {k: v for k, v in inputs.items() if k != "input_ids" and not k.startswith("pixel_values")}
    out["input_ids"] = sequences
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(B, n, dtype=torch.long)], 1)
    if "mm_token_type_ids" in out:
        out["mm_token_type_ids"] = torch.cat([out["mm_token_type_ids"], torch.zeros(B, n, dtype=torch.long)], 1)
    return out


@pytest.mark.parametrize("arch,family,keep", cases("test_continue_from_past_key_values"))
@short_known_failures
def test_continue_from_past_key_values(arch, family, keep):
    """transformers' ``test_generate_continue_from_past_key_values``: 2 tokens, then 1 more from the
    returned cache == 3 tokens in one call (tokens and scores). keep-all: also the plain model's."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    kw = dict(do_sample=False, suppress_tokens=SUPPRESS, return_dict_in_generate=True, output_scores=True)

    def two_calls():
        first = generate(model, inputs, **kw, max_new_tokens=2, min_new_tokens=2)
        second = generate(model, _continued(inputs, first.sequences), **kw, max_new_tokens=1, min_new_tokens=1,
                          past_key_values=first.past_key_values)
        return second.sequences, first.scores + second.scores

    with apply(model, family, keep):
        one = run_case(keep, lambda: generate(model, inputs, **kw, max_new_tokens=3, min_new_tokens=3))
        if one is None:
            return
        seq, scores = run_case(keep, two_calls) or (None, None)
    if seq is None:
        return
    assert_same_tokens(seq, one.sequences, "continued", "one call")
    assert_close_nested(scores, one.scores, "scores", **LOOSE)
    if keep == "keepall":
        ref = plain((arch, "continue"), lambda: generate(model, inputs, **kw, max_new_tokens=3, min_new_tokens=3))
        assert_same_generation(one, ref, **TIGHT)


# --------------------------------------------------------------------------------------- assisted
_ASSISTANTS = {}


def _assistant(arch):
    """A second tiny model of the same architecture (other weights) as the assistant."""
    if arch not in _ASSISTANTS:
        import tiny_models as tm

        builders = {"llava": lambda: tm.tiny_llava(seed=1),
                    "llava_next": lambda: tm.tiny_llava_next("llava_next", seed=1),
                    "llava_onevision": lambda: tm.tiny_llava_next("onevision", seed=1)}
        _ASSISTANTS[arch] = builders.get(arch, lambda: tm.tiny_qwen(arch, seed=1))()
    return _ASSISTANTS[arch]


ASSIST = ("assistant_model", "prompt_lookup")


@pytest.mark.parametrize("arch,family,keep,how", cases("test_assisted_decoding", extras=ASSIST))
@short_known_failures
def test_assisted_decoding(arch, family, keep, how):
    """``assistant_model=`` and ``prompt_lookup_num_tokens=`` on one sample (transformers supports
    assisted decoding at batch size 1): the tokens of greedy decoding with the same handle
    (keep-all: the plain model's), or a VTokenError."""
    model = get_model(arch)
    inputs = get_inputs(arch, model, variant="single")
    gen = dict(GEN, max_new_tokens=4, min_new_tokens=4)
    extra = dict(assistant_model=_assistant(arch)) if how == "assistant_model" else dict(prompt_lookup_num_tokens=2)
    ref = plain((arch, "single greedy"), lambda: generate(model, inputs, **gen))
    with apply(model, family, keep):
        greedy = generate(model, inputs, **gen)
        out = run_case(keep, lambda: generate(model, inputs, **gen, **extra))
    if keep == "keepall":
        assert torch.equal(greedy, ref)
    if out is not None:
        assert_same_tokens(out, greedy, how, "greedy")


# --------------------------------------------------------------------------------------- inputs_embeds
def _embeds(model, inputs):
    with torch.no_grad():
        return model.get_input_embeddings()(inputs["input_ids"])


EMBEDS = ("with_ids", "random_text_only", "without_ids")


@pytest.mark.parametrize("arch,family,keep,form", cases("test_generate_from_inputs_embeds", extras=EMBEDS))
@short_known_failures
def test_generate_from_inputs_embeds(arch, family, keep, form):
    """transformers' ``test_generate_from_inputs_embeds`` / ``test_generate_from_random_inputs_embeds``:

    * ``with_ids``: ``generate(input_ids=..., inputs_embeds=embed(input_ids), pixels...)``;
    * ``random_text_only``: ``generate(input_ids, inputs_embeds=random)`` and nothing else (the
      random-embeds test's call: placeholder ids, no pixel inputs);
    * ``without_ids``: ``generate(inputs_embeds=embed(input_ids), attention_mask, pixels...)``,
      no ``input_ids``.

    keep-all: the plain model's tokens and scores for the same call. Pruned: works (cached ==
    uncached; ``with_ids`` also equals the method's ``input_ids`` path) or raises a VTokenError."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    kw = dict(GEN, return_dict_in_generate=True, output_scores=True)
    embeds = _embeds(model, inputs)
    if form == "random_text_only":
        embeds = torch.rand(embeds.shape, generator=torch.Generator().manual_seed(0))
        call = dict(input_ids=inputs["input_ids"], inputs_embeds=embeds)
    elif form == "without_ids":
        call = {k: v for k, v in inputs.items() if k != "input_ids"}
        call["inputs_embeds"] = embeds
    else:
        call = dict(inputs, inputs_embeds=embeds)

    def run(**more):
        reset_rope_deltas(model)
        return generate(model, call, **kw, **more)

    if keep == "keepall":
        keep_all_generates_as_plain((arch, "embeds", form), run, model, family)
        return
    with apply(model, family, keep):
        out = works_or_refuses(run)
        if out is None:
            return
        if form == "with_ids":
            assert_same_generation(out, generate(model, inputs, **kw), **LOOSE)
        uncached = run(use_cache=False)
    assert_same_tokens(out.sequences, uncached.sequences, "cache", "no cache")
    assert_close_nested(out.scores, uncached.scores, "scores", **LOOSE)


class _ForceAt:
    """A logits processor that forces ``token`` when the sequences reach length ``at``."""

    def __init__(self, token, at):
        self.token, self.at = token, at

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.token] = 0.0
        return scores


@pytest.mark.parametrize("arch,family,keep,prompt", cases("test_generated_placeholder_id",
                                                          extras=("text_only", "embeds_prefill")))
@short_known_failures
def test_generated_placeholder_id(arch, family, keep, prompt):
    """A generated token that is an image placeholder id (nothing stops a model from emitting one:
    transformers' random-embeds test does not suppress them), after a prompt without visual
    tokens: a left-padded text-only batch, or the prompt given as ``inputs_embeds`` with
    ``input_ids`` (``test_generate_from_random_inputs_embeds``' call). There is nothing to prune,
    with or without a cache: the plain model's tokens and scores."""
    from transformers import LogitsProcessorList

    model = get_model(arch)
    ids = torch.randint(1, 80, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    call = dict(input_ids=ids, attention_mask=mask)
    if prompt == "embeds_prefill":
        call["inputs_embeds"] = torch.rand(2, 9, model.config.text_config.hidden_size,
                                           generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True,
              logits_processor=LogitsProcessorList([_ForceAt(IMAGE_ID, ids.shape[1])]))
    for use_cache in (True, False):
        ref = plain((arch, "placeholder", prompt, use_cache), lambda: generate(model, call, **kw, use_cache=use_cache))
        assert ref.sequences[0, ids.shape[1]] == IMAGE_ID
        with apply(model, family, keep):
            out = run_case(keep, lambda: generate(model, call, **kw, use_cache=use_cache))
        if out is not None:
            assert_same_generation(out, ref, **TIGHT)


# --------------------------------------------------------------------------------------- padding, batch
@pytest.mark.parametrize("arch,family,keep,pad", cases("test_padding_and_batch", extras=("left", "right")))
@short_known_failures
def test_padding_and_batch(arch, family, keep, pad):
    """A batch padded on either side (differing visual counts, several images, a sample without
    any) against each sample alone. keep-all: the plain model's logits at every real token and
    its tokens. Pruned: each sample's last-token logits and (left padding) tokens equal the
    sample run alone."""
    from conftest import slice_sample

    model = get_model(arch)
    inputs = get_inputs(arch, model, pad_side=pad)
    valid = inputs["attention_mask"].bool()
    B = valid.shape[0]
    last = torch.where(valid, torch.arange(valid.shape[1]), -1).max(1).values
    gen = pad == "left"  # transformers generates from left-padded batches
    with apply(model, family, keep) as handle:
        with torch.no_grad():
            out = run_case(keep, lambda: model(**inputs))
        if out is None:
            return
        pos = handle.stats.positions.clone() if keep == "pruned" else None
        tokens = generate(model, inputs, **GEN) if gen else None
        singles = []
        for b in range(B):
            one = slice_sample(inputs, b, model)
            with torch.no_grad():
                singles.append((model(**one).logits[0, -1], generate(model, one, **GEN)[0, -3:] if gen else None))
    if keep == "keepall":
        ref = plain((arch, "pad", pad), lambda: model(**inputs).logits)
        torch.testing.assert_close(out.logits[valid], ref[valid], **TIGHT)
        if gen:
            assert torch.equal(tokens, plain((arch, "pad gen", pad), lambda: generate(model, inputs, **GEN)))
        slot = last
    else:
        slot = (pos == last.unsqueeze(1)).int().argmax(1)
    for b, (logit, toks) in enumerate(singles):
        torch.testing.assert_close(out.logits[b, slot[b]], logit, **LOOSE)
        if gen:
            assert torch.equal(tokens[b, -3:], toks), b


# --------------------------------------------------------------------------------------- compile
#: torch.compile traces the whole model: ~15 s for the first handle on 2 CPU cores, a few seconds
#: for each handle that adds graphs. One model (Qwen2-VL: M-RoPE positions, the most involved
#: re-layout; LLaVA-NeXT's compiled forward is covered by tests/test_generate_paths.py) compiled
#: once for the module, three families (a layer-0 stage changes the language model's input length,
#: select and merge re-lay out inside it; the two-stage family runs the same hooks twice)
COMPILE_ARCH = "qwen2_vl"


@pytest.fixture(scope="module")
def compiled_model():
    import torch._dynamo

    model = fresh_model(COMPILE_ARCH)
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = 64  # each handle adds graphs: compile them, never fall back to eager
    model.forward = torch.compile(model.forward, backend="eager")
    yield model
    model.__dict__.pop("forward", None)
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.reset()


@pytest.mark.parametrize("arch,family,keep", cases("test_compiled_forward", archs=(COMPILE_ARCH,),
                                                   families=("pre", "select", "merge")))
@short_known_failures
def test_compiled_forward(arch, family, keep, compiled_model):
    """``model.forward = torch.compile(model.forward)`` (eager backend: dynamo traces, graph breaks
    at the hooks): keep-all equals the plain model, pruned equals the same handle uncompiled."""
    model = get_model(arch)  # the same weights, not compiled
    inputs = get_inputs(arch, model)
    kw = dict(GEN, return_dict_in_generate=True, output_scores=True)
    if keep == "keepall":
        want = plain((arch, "compile ref"), lambda: generate(model, inputs, **kw))
    else:
        with apply(model, family, keep):
            want = generate(model, inputs, **kw)
    with apply(compiled_model, family, keep):
        out = run_case(keep, lambda: generate(compiled_model, inputs, **kw))
    if out is not None:
        assert_same_generation(out, want, **(TIGHT if keep == "keepall" else LOOSE))
