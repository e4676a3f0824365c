"""The method registry (vtoken.methods) and where methods register (issue 15, item 7).

Covers: user registrations never hide the built-ins; names are normalised once (registration and
lookup alike); duplicates raise, ``override=True`` replaces; each built-in registers in the
module that defines its scorer; ``handle.method`` for explicit plans; FlowCut's optional
vision-encoder relay reaches the scorer where the model provides it.

Every test that registers something runs on a private copy of the registry (``registry``
fixture), so other tests never see it.
"""

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

import tiny_models as tm
import vtoken
from conftest import get_inputs, get_model
from vtoken import errors, methods
from vtoken.errors import PruningConfigError
from vtoken.methods import MethodSpec, build_plan, make_scorer, method_spec
from vtoken.plan import Stage, tokens_for
from vtoken.scorers import FastVScorer, FlowCutScorer, KeepAllScorer, Scorer

BUILTINS = {"fastv", "sparsevlm", "pyramiddrop", "fastervlm", "visionzip", "zipvl", "divprune", "dart", "agile",
            "scope", "cdpruner", "vispruner", "flowcut", "rollout", "attnflow", "var", "random", "uniform", "none"}


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the method and scorer registries, restored after the test."""
    methods.available_methods()  # the built-ins are registered before the copy is taken
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))
    monkeypatch.setattr(methods, "_SCORERS", dict(methods._SCORERS))
    return methods


def _keep_all(keep, layer: int = 0):
    return [Stage(layer=layer, scorer=KeepAllScorer(), keep=1.0)]


def _keep_all_too(keep):
    return [Stage(layer=0, scorer=KeepAllScorer(), keep=1.0)]


# ----------------------------------------------------------------------------- defect 1


def test_user_registration_before_first_lookup_keeps_builtins():
    # a fresh interpreter: the user's method is registered before any lookup has run
    script = textwrap.dedent("""
        from vtoken.methods import MethodSpec, available_methods, build_plan, register_method
        from vtoken.plan import Stage
        from vtoken.scorers.baselines import KeepAllScorer

        register_method(MethodSpec("mine", "custom", lambda keep: [Stage(layer=0, scorer=KeepAllScorer(), keep=1.0)]))
        names = available_methods()
        assert "mine" in names and "fastv" in names, names
        (st,) = build_plan("fastv", 8)
        assert st.scorer.name == "fastv"
        print(",".join(names))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert BUILTINS | {"mine"} <= set(done.stdout.strip().splitlines()[-1].split(","))


# ----------------------------------------------------------------------------- defect 2


def test_mixed_case_names_register_and_look_up(registry):
    registry.register_method(MethodSpec("MyMethod", "custom", _keep_all))
    for name in ("MyMethod", "mymethod", "MYMETHOD", "  myMethod "):
        assert method_spec(name).name == "mymethod"
        assert build_plan(name, 8)[0].scorer.name == "none"
    assert "mymethod" in vtoken.available_methods() and "MyMethod" not in vtoken.available_methods()
    # the decorator form too, and the built-ins
    registry.register_method(name=" Other_Method ", family="custom")(_keep_all_too)
    assert method_spec("OTHER_METHOD").builder is _keep_all_too
    assert method_spec("FastV").name == "fastv" and method_spec(" PyramidDrop ").name == "pyramiddrop"
    assert make_scorer("FastV").name == "fastv"
    assert registry.normalize_name("  FastV ") == "fastv"
    with pytest.raises(PruningConfigError, match="unknown method"):
        method_spec(42)


# ----------------------------------------------------------------------------- defect 3


def test_duplicate_builtin_registration_raises_and_override_replaces(registry):
    original = method_spec("fastv")
    for name in ("fastv", "FastV", " FASTV "):
        with pytest.raises(PruningConfigError) as info:
            registry.register_method(MethodSpec(name, "custom", _keep_all))
        assert type(info.value).__name__ == "DuplicateRegistrationError"
        msg = str(info.value)
        assert "'fastv' is already registered" in msg and "vtoken.scorers.attention.fastv_plan" in msg
        assert "override=True" in msg
        assert isinstance(info.value, PruningConfigError)
    assert method_spec("fastv") is original  # untouched by the failed attempts
    # the decorator form raises the same way
    with pytest.raises(PruningConfigError, match="'dart' is already registered"):
        registry.register_method(name="dart", family="custom")(_keep_all_too)
    # an explicit override replaces the built-in (and the original can be put back)
    registry.register_method(MethodSpec("fastv", "custom", _keep_all), override=True)
    assert build_plan("fastv", 8)[0].scorer.name == "none"
    registry.register_method(original, override=True)
    assert method_spec("fastv") is original


def test_duplicate_user_registration_raises(registry):
    registry.register_method(MethodSpec("mine", "custom", _keep_all))
    registry.register_method(MethodSpec("mine", "custom", _keep_all))  # the identical spec again: no-op
    with pytest.raises(PruningConfigError, match="test_registry._keep_all") as info:
        registry.register_method(MethodSpec("MINE", "custom", _keep_all_too))
    assert isinstance(info.value, errors.DuplicateRegistrationError)
    assert method_spec("mine").builder is _keep_all
    registry.register_method(MethodSpec("mine", "custom", _keep_all_too), override=True)
    assert method_spec("mine").builder is _keep_all_too
    assert registry.unregister_method("Mine").builder is _keep_all_too
    assert "mine" not in vtoken.available_methods()


def test_duplicate_scorer_registration_raises(registry):
    class Impostor(Scorer):
        name = "FastV"

    with pytest.raises(PruningConfigError, match="vtoken.scorers.attention.FastVScorer") as info:
        registry.register_scorer(Impostor)
    assert isinstance(info.value, errors.DuplicateRegistrationError)
    assert make_scorer("fastv").__class__ is FastVScorer
    registry.register_scorer(FastVScorer)  # the same class again: no-op
    registry.register_scorer(Impostor, override=True)
    assert isinstance(make_scorer("fastv"), Impostor)


# ----------------------------------------------------------------------------- placement


def test_each_builtin_registers_beside_its_scorer():
    import vtoken.scorers.catalog as catalog

    for name in sorted(BUILTINS):
        spec = method_spec(name)
        scorers = {type(st.scorer) for st in spec.builder(64)}
        assert len(scorers) == 1, (name, scorers)
        (cls,) = scorers
        assert spec.builder.__module__ == cls.__module__ != catalog.__name__, (name, spec.builder.__module__)
        # the builder follows its scorer class in that module
        assert inspect.getsourcelines(spec.builder)[1] > inspect.getsourcelines(cls)[1], name
        assert methods._SCORERS[cls.name] is cls
    assert "register_method(" not in inspect.getsource(catalog)


# ----------------------------------------------------------------------------- defect 4


def test_handle_method_for_explicit_plans_and_presets():
    model = get_model("llava")
    plan = [Stage(layer=2, scorer=FastVScorer(), keep=8)]
    with vtoken.apply_pruning(model, plan=plan) as h:
        assert h.method is None
        assert "method=None" in repr(h)
    with vtoken.apply_pruning(model, method="fastv", plan=plan) as h:  # method is ignored with a plan
        assert h.method is None
    with vtoken.apply_pruning(model, method="FastV", keep=8) as h:
        assert h.method == "fastv"


# ----------------------------------------------------------------------------- defect 5: FlowCut's relay


def _normalised(x):
    return x / x.sum()


def _flowcut_reference(model, inputs, keep, K=2, momentum=0.5):
    """FlowCut's flow (vtoken's reading, see FlowCutScorer) from an independent eager forward:
    flow = [CLS]-attention of the encoder layer LLaVA takes its features from (normalised), then
    flow = m * flow + (1 - m) * (last prompt token's head-mean attention at LLM layer l,
    normalised) for l = 0..K-1; keep the top ``keep`` tokens of each image. Returns, per sample,
    the kept visual-token ordinals."""
    ref = tm.tiny_llava(attn="eager")
    ref.load_state_dict(model.state_dict())
    cfg = ref.config
    with torch.no_grad():
        llm = ref(**inputs, output_attentions=True).attentions
        enc = ref.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    # hidden_states[vision_feature_layer] is the output of encoder layer len + vision_feature_layer
    enc_layer = cfg.vision_config.num_hidden_layers + cfg.vision_feature_layer
    cls = enc[enc_layer][:, :, 0, 1:].mean(dim=1)  # (images, patches): [CLS] row, [CLS] column dropped
    out, image = [], 0
    for b in range(inputs["input_ids"].shape[0]):
        cols = (inputs["input_ids"][b] == tm.IMAGE_ID).nonzero().flatten()
        per = cls.shape[1]
        kept = []
        for i in range(cols.numel() // per):
            c = cols[i * per:(i + 1) * per]
            flow = _normalised(cls[image])
            for layer in range(K):
                cur = _normalised(llm[layer][b, :, -1, c].mean(dim=0))
                flow = momentum * flow + (1 - momentum) * cur
            kept += (torch.topk(flow, tokens_for(keep, per)).indices + i * per).tolist()
            image += 1
        out.append(sorted(kept))
    return out


def test_flowcut_relay_reaches_the_scorer_and_matches_reference():
    model = get_model("llava")
    inputs = get_inputs("llava", model)  # 3 samples: 1, 2 and 0 images, left padding
    keep = 0.3
    with vtoken.apply_pruning(model, method="flowcut", keep=keep) as h:
        with torch.no_grad():
            model(**inputs)
        stage = h.stats.stages[0]
        relayed = [k.tolist() for k in stage.kept]
        assert stage.diagnostics["relay"].tolist() == [True, True, True]  # one per image
    with vtoken.apply_pruning(model, method="flowcut", keep=keep, relay=False) as h:
        with torch.no_grad():
            model(**inputs)
        plain = [k.tolist() for k in h.stats.stages[0].kept]
        assert h.stats.stages[0].diagnostics["relay"].tolist() == [False, False, False]
    assert relayed != plain  # the relay changes what is kept on this model
    assert relayed == _flowcut_reference(model, inputs, keep)


def test_flowcut_relay_per_segment_on_qwen_and_absent_where_unmapped():
    # Qwen2-VL: no [CLS]; the adapter's stand-in (mean attention received) relays the images; the
    # video segment has no encoder capture mapped to it and runs without the relay
    model = get_model("qwen2_vl")
    inputs = get_inputs("qwen2_vl", model)  # sample 1 has an image and a video
    with vtoken.apply_pruning(model, method="flowcut", keep=0.3) as h:
        with torch.no_grad():
            model(**inputs)
        kinds = [seg.kind for segs in h.stats.segments for seg in segs]
        assert h.stats.stages[0].diagnostics["relay"].tolist() == [k == "image" for k in kinds]
        assert "video" in kinds
    # LLaVA-NeXT maps no encoder attention: the optional relay is simply absent (no error)
    model = get_model("llava_next")
    with vtoken.apply_pruning(model, method="flowcut", keep=0.3) as h:
        with torch.no_grad():
            model(**get_inputs("llava_next", model))
        assert not h.stats.stages[0].diagnostics["relay"].any()
    assert "vision_attn" in FlowCutScorer().optional_needs
