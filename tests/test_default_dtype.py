"""No internal tensor depends on the global default dtype (issue 15, item 4).

A bf16 model pruned while ``torch.set_default_dtype(torch.bfloat16)`` is in force must give exactly
what the same model gives under the float32 default, for every method, in select and merge mode.
"""

import pytest
import torch

import vtoken
from vtoken.methods import depth_scaled_options
from conftest import get_inputs
import tiny_models as tm
from tiny_models import learned_options

#: decode-time methods (a2sf, lookm) leave a forward without a cache as the model's own (nothing is
#: decoded): tests/test_decode_stages.py covers them in generate
METHODS = [m for m in vtoken.available_methods() if m not in ("none",) and vtoken.methods.method_spec(m).family != "decode"]
#: presets with more LLM stages than a 4-layer model has layers after layer 0 (depth_scaled_options
#: cannot place them); they take any number of stages, so they run at layers 1..depth-1
DEEPER_THAN_TINY = ("mustdrop",)
#: methods that prune videos only (they refuse images): checked on a tiny Qwen2-VL with a video
VIDEO_ONLY = {"holitom", "flashvid"}


@pytest.fixture(scope="module")
def bf16_llava():
    model = tm.tiny_llava(seed=3).to(torch.bfloat16)
    return model, get_inputs("llava", model)


def _run(model, inputs, method, mode):
    depth = len(model.model.language_model.layers)
    options = depth_scaled_options(method, depth)
    if not options and method in DEEPER_THAN_TINY:  # more LLM stages than the tiny model has layers
        options = {"layers": tuple(range(1, depth))}
    if mode == "merge":
        options["mode"] = "merge"
    options.update(learned_options(method, model))  # gtc, dyvte: an untrained network shaped for the model
    inputs = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    with vtoken.apply_pruning(model, method=method, keep=9, **options) as handle:
        with torch.no_grad():
            out = model(**inputs).logits
        kept = [[k.tolist() for k in st.kept] for st in handle.stats.stages]
        positions = handle.stats.positions.clone()
    return out, positions, kept


@pytest.fixture(scope="module")
def bf16_qwen_video():
    model = tm.tiny_qwen("qwen2_vl", seed=3).to(torch.bfloat16)
    return model, tm.qwen_inputs(model, [[("video", (4, 4, 4))], [("video", (2, 4, 8))]])


@pytest.mark.parametrize("method", METHODS)
def test_bf16_default_dtype_changes_nothing(request, method):
    model, inputs = request.getfixturevalue("bf16_qwen_video" if method in VIDEO_ONLY else "bf16_llava")
    for mode in ("select", "merge"):
        try:
            ref = _run(model, inputs, method, mode)
        except vtoken.PruningConfigError:
            assert mode == "merge", f"{method} refused select mode"
            continue  # the method does not take mode=; nothing to compare
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            got = _run(model, inputs, method, mode)
        finally:
            torch.set_default_dtype(previous)
        assert got[2] == ref[2], f"{method}/{mode}: kept tokens differ under a bf16 default dtype"
        assert torch.equal(got[1], ref[1]), f"{method}/{mode}: kept positions differ under a bf16 default dtype"
        assert torch.equal(got[0], ref[0]), f"{method}/{mode}: logits differ under a bf16 default dtype"
