"""Signals captured outside a pruned call never leak into the next one (issue 15, item 3).

Users call ``model.model.get_image_features(...)`` for embeddings; the vision probe of a handle
that reads encoder attention (fastervlm, visionzip) sees that encoder run too. The next pruned
call must score from its own images only: same logits and kept tokens as without the extra call.
"""

import pytest
import torch

import vtoken
from conftest import get_inputs, get_model
import tiny_models as tm


def _features(model, inputs):
    mm = model.model
    kwargs = {"pixel_values": inputs["pixel_values"]}
    if "image_sizes" in inputs:
        kwargs["image_sizes"] = inputs["image_sizes"]
    if "image_grid_thw" in inputs:
        kwargs = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    with torch.no_grad():
        return mm.get_image_features(**kwargs)


@pytest.mark.parametrize("method", ["fastervlm", "visionzip"])
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_standalone_encoder_call_does_not_leak(arch, method, call):
    model = get_model(arch)
    if arch == "llava":
        inputs = get_inputs(arch, model)
    else:  # encoder attention is mapped for images (not video): two samples with images of two sizes
        inputs = tm.qwen_inputs(model, [[("image", (1, 8, 8))], [("image", (1, 4, 8))]])
    other = get_inputs(arch, model, variant="single")

    def run(handle):
        with torch.no_grad():
            if call == "forward":
                out = model(**inputs).logits
            else:
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        return out, [[k.tolist() for k in st.kept] for st in handle.stats.stages]

    with vtoken.apply_pruning(model, method=method, keep=6) as handle:
        ref = run(handle)
        _features(model, other)      # another image's encoder run, outside any pruned call
        _features(model, inputs)     # and the same images' (a stale copy of the right size)
        got = run(handle)
    assert got[1] == ref[1]
    assert torch.equal(got[0], ref[0])
