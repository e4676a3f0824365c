"""Pruned generation through transformers' fast path: ``generate(cache_implementation="static")``,
its compiled decode step included (issue 23, item 1).

The expectation is independent of the static-cache code: the same handle's default path
(``generate`` with the dynamic cache, pruned), whose own equivalence to the plain model with a
keep-all handle and to no-cache generation the conformance suite checks. Here the static cache
must give the same tokens (and scores to float tolerance) on every adapter and pruning family,
in every generation mode, with the layers after a stage sized to what they keep, and with the
decode step traceable by ``torch.compile`` without a graph break (``fullgraph=True``).
"""

import pytest
import torch
from transformers import CompileConfig, StaticCache
from transformers.generation import StoppingCriteria, StoppingCriteriaList

import vtoken
from conformance_cases import (ARCH_NAMES, FAMILIES, FAMILY_NAMES, GEN, LOOSE, QWEN, apply, assert_same_generation,
                               assert_same_tokens, fresh_model, one_thread, reset_rope_deltas)
from conftest import SUPPRESS, get_inputs, get_model

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

OUT = dict(return_dict_in_generate=True, output_scores=True)


def generate(model, inputs, seed=0, **kw):
    torch.manual_seed(seed)
    reset_rope_deltas(model)
    with torch.no_grad():
        return model.generate(**inputs, **kw)


def static_and_dynamic(model, inputs, family, **kw):
    """(static-cache result, dynamic-cache result) of the same pruned ``generate`` call."""
    with apply(model, family, "pruned"):
        dynamic = generate(model, inputs, **kw)
        static = generate(model, inputs, **kw, cache_implementation="static")
    return static, dynamic


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_static_equals_dynamic_greedy(arch, family):
    """Greedy, a left-padded batch with ragged visual counts (a sample without an image, one with
    two): the static cache's tokens and scores are the dynamic cache's."""
    model = get_model(arch)
    static, dynamic = static_and_dynamic(model, get_inputs(arch, model), family, **GEN, **OUT)
    assert_same_generation(static, dynamic, **LOOSE)


@pytest.mark.parametrize("arch", ("llava", "qwen2_vl"))
def test_static_equals_dynamic_eager_attention(arch):
    """Eager attention takes additive float masks (SDPA boolean ones): both formats are built."""
    model = fresh_model(arch, attn="eager")
    static, dynamic = static_and_dynamic(model, get_inputs(arch, model), "select", **GEN, **OUT)
    assert_same_generation(static, dynamic, **LOOSE)


SAMPLE = dict(max_new_tokens=3, min_new_tokens=3, do_sample=True, top_k=5, top_p=0.9, suppress_tokens=SUPPRESS)
MODES = {
    "sample": SAMPLE,
    "beams": dict(GEN, num_beams=2),
    "beam_sample": dict(SAMPLE, num_beams=2),
    "return_sequences": dict(SAMPLE, num_return_sequences=2),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ("llava", "llava_next", "qwen2_5_vl", "qwen3_vl"))
def test_static_generation_modes(arch, mode):
    """Sampling (top-k, top-p), beams, beam sampling and several return sequences on the static
    cache give what the dynamic cache gives with the same seed. One sample per prompt (a
    multi-image sample's beams are expanded image by image on transformers 5.17, see
    test_conformance_generate)."""
    model = get_model(arch)
    inputs = get_inputs(arch, model, variant="single") if arch not in QWEN else get_inputs(arch, model)
    static, dynamic = static_and_dynamic(model, inputs, "select", **MODES[mode], **OUT)
    assert_same_generation(static, dynamic, **LOOSE)


class _StopAt(StoppingCriteria):
    """Stops a row once it has generated ``n`` tokens (counted from the prompt length)."""

    def __init__(self, prompt_len: int, n: int):
        self.prompt_len, self.n = prompt_len, n

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.prompt_len >= self.n, dtype=torch.bool)


class _Collect:
    """A streamer that records what ``generate`` puts (the prompt first, then each new token)."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


@pytest.mark.parametrize("arch", ("llava", "qwen2_vl"))
def test_static_streamer_and_stopping_criteria(arch):
    """A streamer sees the static cache's tokens as they come; a stopping criterion ends the static
    generation where it ends the dynamic one."""
    model = get_model(arch)
    inputs = get_inputs(arch, model, variant="single")
    n = inputs["input_ids"].shape[1]
    kw = dict(max_new_tokens=5, do_sample=False, suppress_tokens=SUPPRESS,
              stopping_criteria=StoppingCriteriaList([_StopAt(n, 2)]))
    streamer = _Collect()
    with apply(model, "select", "pruned"):
        dynamic = generate(model, inputs, **kw)
        static = generate(model, inputs, **kw, cache_implementation="static", streamer=streamer)
    assert_same_tokens(static, dynamic)
    assert static.shape[1] == n + 2
    streamed = torch.cat([c.view(1, -1) for c in streamer.chunks[1:-1]], dim=1)
    assert streamer.chunks[-1] is None and torch.equal(streamed, static[:, n:])


@pytest.mark.parametrize("family", ("pre", "select", "multi"))
@pytest.mark.parametrize("arch", ("llava", "qwen2_5_vl"))
def test_pruned_layers_get_fewer_slots(arch, family):
    """The layers after a stage hold as many slots as that stage keeps (its re-laid-out prefill,
    the longest row's kept tokens plus the left padding the batch needs) plus the new tokens; the
    layers before the first stage hold the whole prompt. Expected lengths from the handle's stats:
    row b keeps its valid tokens minus the visual tokens the stage dropped."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    kw = dict(GEN, return_dict_in_generate=True, cache_implementation="static")
    P = inputs["input_ids"].shape[1]
    T = generate(model, inputs, **kw).past_key_values.layers[0].keys.shape[2] - P  # the plain model's new slots
    with apply(model, family, "pruned") as handle:
        out = generate(model, inputs, **kw)
        stats = handle.stats
    valid = inputs["attention_mask"].sum(1).tolist()
    slots = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    stage_layers = [st.layer for st in stats.stages]
    for layer, got in enumerate(slots):
        done = [i for i, L in enumerate(stage_layers) if L <= layer]
        if not done:
            assert got == P + T, (layer, got)
            continue
        st = stats.stages[done[-1]]
        kept = [valid[b] - stats.visual_tokens[b] + int(st.kept[b].numel()) for b in range(len(valid))]
        assert got == max(kept) + T, (layer, got, kept)
    assert min(slots) < P  # the pruned layers' buffers really are shorter


def _compiled(**kw):
    """A compile config that fails on any graph break (``fullgraph``), with the cheap ``eager``
    backend (dynamo's tracing is what is under test), allowed on the CPU."""
    config = CompileConfig(fullgraph=True, backend="eager", dynamic=False, **kw)
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize("family", ("pre", "select", "merge"))
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_compiled_static_decode_traces_without_graph_breaks(arch, family):
    """transformers compiles the decode step of a static cache (on CUDA by default, here forced
    with ``compile_config``): with a pruning handle attached the whole step traces in one graph
    (``fullgraph=True`` raises on a graph break) and generates what the dynamic cache generates;
    a second call reuses the compiled step."""
    torch._dynamo.reset()
    model = fresh_model(arch)
    inputs = get_inputs(arch, model)
    kw = dict(GEN, **OUT)
    with apply(model, family, "pruned"):
        dynamic = generate(model, inputs, **kw)
        for _ in range(2):
            static = generate(model, inputs, **kw, cache_implementation="static", compile_config=_compiled())
            assert_same_generation(static, dynamic, **LOOSE)
    torch._dynamo.reset()


def test_keep_all_compiled_static_decode_equals_plain():
    """A handle that drops nothing: the compiled static decode is the plain model's, no graph break."""
    torch._dynamo.reset()
    model = fresh_model("llava")
    inputs = get_inputs("llava", model)
    kw = dict(GEN, **OUT, cache_implementation="static", compile_config=_compiled())
    plain = generate(model, inputs, **kw)
    with apply(model, "select", "keepall"):
        out = generate(model, inputs, **kw)
    assert_same_generation(out, plain, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def _static_cache(model, inputs, new_tokens):
    return StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + new_tokens)


@pytest.mark.parametrize("arch", ("llava", "qwen2_vl"))
def test_reused_static_cache(arch):
    """A StaticCache the user passes, reset and passed again: after a pruned call (its layers
    re-sized) it serves a plain call as a fresh cache would, and a pruned call again."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    kw = dict(GEN)
    cache = _static_cache(model, inputs, 3)
    plain = generate(model, inputs, **kw, past_key_values=_static_cache(model, inputs, 3))
    with apply(model, "select", "pruned"):
        dynamic = generate(model, inputs, **kw)
        assert_same_tokens(generate(model, inputs, **kw, past_key_values=cache), dynamic)
        cache.reset()
    assert_same_tokens(generate(model, inputs, **kw, past_key_values=cache), plain)
    cache.reset()
    with apply(model, "pre", "pruned"):
        dynamic = generate(model, inputs, **kw)
        assert_same_tokens(generate(model, inputs, **kw, past_key_values=cache), dynamic)


def test_early_initialized_static_cache():
    """A StaticCache allocated before the prefill (``early_initialization``): the pruned layers'
    buffers are allocated again at their pruned length, and the result is the dynamic cache's."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    cache = _static_cache(model, inputs, 3)
    cfg = model.config.get_text_config()
    cache.early_initialization(batch_size=inputs["input_ids"].shape[0], num_heads=cfg.num_key_value_heads,
                               head_dim=cfg.hidden_size // cfg.num_attention_heads, dtype=model.dtype,
                               device=model.device)
    with apply(model, "select", "pruned"):
        dynamic = generate(model, inputs, **GEN)
        static = generate(model, inputs, **GEN, past_key_values=cache)
    assert_same_tokens(static, dynamic)
    assert cache.layers[-1].keys.shape[2] < cache.layers[0].keys.shape[2]


def test_static_cache_after_remove_refuses_to_continue():
    """A static cache a handle pruned cannot be continued by the plain model (its pruned layers are
    shorter): asked for its length after ``remove()``, it says so."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    handle = vtoken.apply_pruning(model, method=FAMILIES["select"][0], keep=FAMILIES["select"][2],
                                  **FAMILIES["select"][1])
    out = generate(model, inputs, **GEN, return_dict_in_generate=True, cache_implementation="static")
    handle.remove()
    with pytest.raises(vtoken.VTokenError, match="removed"):
        out.past_key_values.get_seq_length()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ("pre", "select"))
@pytest.mark.parametrize("arch", ("llava", "qwen2_vl"))
def test_cuda_compiled_static_decode_equals_dynamic(arch, family):
    """On CUDA, transformers compiles the static decode step itself (inductor, "reduce-overhead":
    CUDA graphs): with a pruning handle its tokens are the dynamic cache's, in a second call too
    (the recorded graphs replayed)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    model = fresh_model(arch).cuda()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in get_inputs(arch, model).items()}
    kw = dict(GEN, max_new_tokens=6, min_new_tokens=6)
    with apply(model, family, "pruned"):
        dynamic = generate(model, inputs, **kw)
        for _ in range(2):
            assert_same_tokens(generate(model, inputs, **kw, cache_implementation="static"), dynamic)
    torch._dynamo.reset()


def test_text_only_prompt_compiled_static_decode_has_no_graph_break():
    """A text-only prompt with a pruning handle attached on the static cache: nothing to prune, and
    the compiled decode step traces in one graph as the plain model's does."""
    torch._dynamo.reset()
    model = fresh_model("llava")
    ids = torch.randint(1, 80, (2, 12))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    kw = dict(GEN, cache_implementation="static", compile_config=_compiled())
    plain = generate(model, inputs, **kw)
    with apply(model, "select", "pruned"):
        assert_same_tokens(generate(model, inputs, **kw), plain)
    torch._dynamo.reset()
