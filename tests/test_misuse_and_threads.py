"""A demanding user's paths (issue 15, "beyond the list"): eager vision probes, attention-
implementation switches after ``apply_pruning``, bad arguments, handles after ``remove()``, and
two models / two threads at once."""

import threading

import pytest
import torch

import vtoken
from conftest import SUPPRESS, get_inputs, get_model
from tiny_models import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen
from vtoken.errors import HandleRemovedError, PruningConfigError, UnsupportedModelError, VTokenError

VISION_METHODS = ("fastervlm", "visionzip", "flowcut")


def _images_only(arch, model):
    """A left-padded batch of images only (vision-encoder methods map images, not video)."""
    if arch.startswith("qwen"):
        return qwen_inputs(model, [[("image", (1, 8, 8))], [("image", (1, 4, 8)), ("image", (1, 8, 4))], []])
    return get_inputs(arch, model)


def _run(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw)


def _pruned(model, inputs, method, keep=8, **kw):
    with vtoken.apply_pruning(model, method=method, keep=keep) as handle:
        out = _run(model, inputs, **kw)
        return out, handle.stats.positions.clone()


# --- 1. vision-encoder probes under eager attention -------------------------------------------


#: the adapters whose vision_attention_module() is not None (LLaVA-NeXT / OneVision and Qwen2.5-VL
#: refuse encoder-attention methods at apply time, see test_vision_methods_refused_where_unmapped)
VISION_PROBE_ARCHS = ("llava", "qwen2_vl", "qwen3_vl")


def test_every_vision_probe_uses_its_own_eager_function():
    import sys

    from vtoken.adapters import get_adapter
    from vtoken.hooks.probe import eager_attention_of

    for arch in VISION_PROBE_ARCHS:
        module = get_adapter(get_model(arch, attn="eager")).vision_attention_module()
        own = sys.modules[type(module).__module__].eager_attention_forward
        assert eager_attention_of(module) is own, arch


@pytest.mark.parametrize("arch", VISION_PROBE_ARCHS)
def test_vision_probe_eager_equals_sdpa(arch):
    """FasterVLM, VisionZip and FlowCut's relay read the vision encoder's attention; with the model
    built eager the probe must run the encoder's own eager attention (CLIP has no grouped KV heads)
    and keep the same tokens as with SDPA."""
    sdpa, eager = get_model(arch), get_model(arch, attn="eager")
    inputs = _images_only(arch, sdpa)
    for method in VISION_METHODS:
        a, pos_a = _pruned(sdpa, inputs, method)
        b, pos_b = _pruned(eager, inputs, method)
        assert torch.equal(pos_a, pos_b), method
        valid = pos_a >= 0
        torch.testing.assert_close(a.logits[valid], b.logits[valid], atol=1e-4, rtol=1e-4, msg=method)


@pytest.mark.parametrize("arch", ["llava_next", "qwen2_5_vl"])
def test_vision_methods_refused_where_unmapped(arch):
    model = get_model(arch)
    for method in ("fastervlm", "scope", "vispruner"):
        with pytest.raises(PruningConfigError, match="reads vision-encoder attention.*use an LLM-side method"):
            vtoken.apply_pruning(model, method=method, keep=8)
        assert "_vtoken_handle" not in model.__dict__


# --- 2. model.set_attn_implementation after apply_pruning -------------------------------------


def _fresh(arch, attn):
    return tiny_llava(attn=attn) if arch == "llava" else tiny_qwen(arch, attn=attn)


@pytest.mark.parametrize("arch,start,to,method", [("llava", "sdpa", "eager", "fastervlm"),
                                                  ("llava", "eager", "sdpa", "fastv"),
                                                  ("qwen2_vl", "eager", "sdpa", "fastv")])
def test_switching_attention_implementation_after_apply(arch, start, to, method):
    """The probed layers (LLM rows and vision encoder) follow the model's implementation: results
    after the switch equal a handle attached after it (an eager probe fed SDPA's mask was wrong)."""
    model = _fresh(arch, start)
    inputs = _images_only(arch, model)
    gen_kw = dict(max_new_tokens=2, do_sample=False, suppress_tokens=SUPPRESS)
    handle = vtoken.apply_pruning(model, method=method, keep=8)
    try:
        _run(model, inputs)
        model.set_attn_implementation(to)
        switched, pos = _run(model, inputs), handle.stats.positions.clone()
        with torch.no_grad():
            gen = model.generate(**inputs, **gen_kw)
    finally:
        handle.remove()
    fresh, fresh_pos = _pruned(model, inputs, method)
    with vtoken.apply_pruning(model, method=method, keep=8), torch.no_grad():
        fresh_gen = model.generate(**inputs, **gen_kw)
    assert torch.equal(pos, fresh_pos)
    torch.testing.assert_close(switched.logits[pos >= 0], fresh.logits[pos >= 0], atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, fresh_gen)


def test_output_attentions_after_switch_to_eager_keep_all():
    """keep=1.0 on a model attached under SDPA then switched to eager: every layer returns its
    attention map, as the plain model does (the probed layer used to stay on SDPA and drop its map)."""
    model = _fresh("llava", "sdpa")
    inputs = get_inputs("llava", model)
    valid = inputs["attention_mask"].bool()
    for method in ("fastv", "fastervlm"):
        handle = vtoken.apply_pruning(model, method=method, keep=1.0)
        model.set_attn_implementation("eager")
        try:
            pruned = _run(model, inputs, output_attentions=True)
        finally:
            handle.remove()
        plain = _run(model, inputs, output_attentions=True)
        model.set_attn_implementation("sdpa")
        n = len(plain.attentions)
        assert n == model.config.text_config.num_hidden_layers
        assert len(pruned.attentions) == n and all(a is not None for a in pruned.attentions), method
        for a, b in zip(pruned.attentions, plain.attentions):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(pruned.logits[valid], plain.logits[valid])


# --- 3. bad arguments, handles after remove ---------------------------------------------------


@pytest.mark.parametrize("keep,match", [(0, "positive"), (-1, "positive"), (1.5, r"\(0, 1\]"), ("64", "got str"),
                                        (True, "got bool"), (None, "got NoneType"), (float("nan"), "nan"),
                                        (8.0, "Pass an int")])
def test_bad_keep(keep, match):
    model = get_model("llava")
    with pytest.raises(PruningConfigError, match=match):
        vtoken.apply_pruning(model, method="fastv", keep=keep)
    assert "_vtoken_handle" not in model.__dict__


def _stage(layer=2, scorer="fastv", keep=8, mode="select"):
    return vtoken.Stage(layer, scorer, keep, mode=mode)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="fastvv"), "unknown method 'fastvv'; known methods: .*fastv"),
    (dict(method="fastv", bogus=1), "bad option for method 'fastv'.*options it takes: K"),
    (dict(method=None, plan=None), r"needs a method name .* or an explicit plan"),
    (dict(plan=[]), "non-empty list of vtoken.Stage"),
    (dict(plan=[1]), "must be a vtoken.Stage; got int"),
    (dict(plan=[_stage(layer=4)]), r"outside the model's 4 decoder layers \(valid: 0..3\)"),
    (dict(plan=[_stage(layer=99)]), "outside the model's 4 decoder layers"),
    (dict(method="fastv", mode="bogus"), "mode must be 'select' or 'merge'; got 'bogus'"),
    (dict(method="fastv", backend="cuda"), r"backend must be one of \('auto', 'torch', 'triton'\); got 'cuda'"),
    (dict(plan=[_stage()], K=3), "apply to method presets, not to an explicit plan"),
])
def test_bad_arguments(kwargs, match):
    model = get_model("llava")
    with pytest.raises(PruningConfigError, match=match):
        vtoken.apply_pruning(model, **kwargs)
    assert "_vtoken_handle" not in model.__dict__ and "generate" not in model.__dict__


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer=-1), r"Stage.layer must be an int >= 0"),
    (dict(layer=2.0), r"Stage.layer must be an int >= 0"),
    (dict(mode="bogus"), "Stage.mode must be 'select' or 'merge'"),
    (dict(scorer="nope"), "unknown scorer 'nope'"),
    (dict(scorer=None), r"Stage.scorer must be a registered scorer name .* got NoneType None"),
    (dict(scorer=3), r"Stage.scorer must be a registered scorer name .* got int 3"),
])
def test_bad_stage(kwargs, match):
    with pytest.raises(PruningConfigError, match=match):
        _stage(**kwargs)


def test_scorer_class_instead_of_instance():
    from vtoken.scorers.attention import FastVScorer

    with pytest.raises(PruningConfigError, match=r"pass an instance, FastVScorer\(\)"):
        _stage(scorer=FastVScorer)


@pytest.mark.parametrize("obj,match", [(None, "got NoneType None"), ("llava-hf/llava-1.5-7b-hf", "got str"),
                                       (object(), "got object"), (torch.nn.Linear(2, 2), "does not support Linear")])
def test_not_a_supported_model(obj, match):
    with pytest.raises(UnsupportedModelError, match=match) as err:
        vtoken.apply_pruning(obj, method="fastv", keep=8)
    assert "LlavaForConditionalGeneration" in str(err.value)


def test_model_class_instead_of_instance():
    from transformers import LlavaForConditionalGeneration

    with pytest.raises(UnsupportedModelError, match="the class LlavaForConditionalGeneration itself"):
        vtoken.apply_pruning(LlavaForConditionalGeneration, method="fastv", keep=8)


def test_keep_above_the_image_keeps_it_whole():
    """Documented: an int budget above an image's tokens keeps the image whole (keep-all)."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    plain = _run(model, inputs).logits
    with vtoken.apply_pruning(model, method="fastv", keep=10_000) as handle:
        out = _run(model, inputs).logits
        kept = handle.stats.summary()
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[valid], plain[valid])
    assert "kept L2:36;" in kept and "kept L2:72;" in kept


def test_twice_and_after_remove():
    model = get_model("llava")
    inputs = get_inputs("llava", model, variant="single")
    handle = vtoken.apply_pruning(model, method="fastv", keep=8)
    with pytest.raises(vtoken.AlreadyPrunedError, match="call handle.remove()"):
        vtoken.apply_pruning(model, method="random", keep=8)
    _run(model, inputs)
    stats = handle.stats
    handle.remove()
    handle.remove()  # documented no-op
    assert not handle.active and handle.stats is not None and handle.stats.positions.equal(stats.positions)
    with pytest.raises(HandleRemovedError, match="removed and prunes nothing"):
        with handle:
            pass
    assert issubclass(HandleRemovedError, VTokenError)
    assert "_vtoken_handle" not in model.__dict__ and "generate" not in model.__dict__
    with vtoken.apply_pruning(model, method="fastv", keep=8) as again:  # a new handle works
        _run(model, inputs)
        assert again.prefills == 1


# --- 4. two models, two threads ----------------------------------------------------------------


def _batches(arch, model):
    if arch == "llava":
        return [llava_inputs(model, [3, 6, 5], [1, 2, 0], [4, 2, 3]), llava_inputs(model, [4], [1], [5]),
                llava_inputs(model, [2, 3], [1, 1], [2, 6], pad_side="right", seed=3)]
    return [qwen_inputs(model, [[("image", (1, 8, 8))], [("image", (1, 4, 8)), ("video", (2, 4, 4))], []]),
            qwen_inputs(model, [[("image", (1, 8, 8))]]),
            qwen_inputs(model, [[("image", (1, 4, 4))], [("image", (1, 8, 8))]], seed=2)]


def _generate(model, handle, inputs, use_cache=True):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS,
                             use_cache=use_cache)
    return out, handle.stats.positions.clone(), handle.prefills


def _threads(jobs):
    """jobs: list of callables run each in its own thread; returns the errors raised."""
    errors, start = [], threading.Barrier(len(jobs))

    def wrap(job):
        try:
            start.wait()
            job()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return errors


def test_two_models_alternately_and_in_two_threads():
    setups = {"llava": ("visionzip", get_model("llava")), "qwen3_vl": ("dart", get_model("qwen3_vl"))}
    handles = {a: vtoken.apply_pruning(m, method=meth, keep=6) for a, (meth, m) in setups.items()}
    try:
        batches = {a: _batches(a, m) for a, (_, m) in setups.items()}
        ref = {a: [_generate(setups[a][1], handles[a], b)[:2] for b in batches[a]] for a in setups}
        for j in (2, 0, 1):  # alternately on one thread
            for a in setups:
                out, pos, _ = _generate(setups[a][1], handles[a], batches[a][j])
                assert torch.equal(out, ref[a][j][0]) and torch.equal(pos, ref[a][j][1]), (a, j)
        mismatches = []

        def worker(a, order):
            before = handles[a].prefills
            for j in order:
                out, pos, _ = _generate(setups[a][1], handles[a], batches[a][j])
                if not (torch.equal(out, ref[a][j][0]) and torch.equal(pos, ref[a][j][1])):
                    mismatches.append((a, j))
            assert handles[a].prefills == before + len(order)  # per-thread count: this thread's prefills

        errors = _threads([lambda: worker("llava", [0, 1, 2, 0, 2]), lambda: worker("qwen3_vl", [2, 1, 0, 1, 2])])
        assert not errors and not mismatches
    finally:
        for h in handles.values():
            h.remove()


def test_one_model_one_handle_two_threads():
    """Per-call state is thread-local: two threads sharing one handle get their single-threaded
    results, cached and uncached generation included, and each reads its own stats."""
    model = get_model("qwen2_vl")
    batches = _batches("qwen2_vl", model)
    with vtoken.apply_pruning(model, method="flowcut", keep=6) as handle:
        ref = {(j, c): _generate(model, handle, b, c)[:2] for j, b in enumerate(batches) for c in (True, False)}
        mismatches = []

        def worker(order):
            for j, c in order:
                out, pos, _ = _generate(model, handle, batches[j], c)
                if not (torch.equal(out, ref[(j, c)][0]) and torch.equal(pos, ref[(j, c)][1])):
                    mismatches.append((j, c))

        errors = _threads([lambda: worker([(0, True), (2, False), (1, True), (0, False)]),
                           lambda: worker([(2, True), (1, False), (0, True), (2, False)])])
        assert not errors and not mismatches
