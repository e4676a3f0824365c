"""Invariant 4 (batch == each sample alone) when a stage leaves the batch as long as it was.

A stage re-lays-out every row (kept tokens in order, new padding on the left), but the batch only
gets shorter when its longest row loses tokens. With one sample pruned and the longest sample
keeping all its visual segments whole (each below the budget), the batch keeps its length while
the pruned row's tokens move. Qwen3-VL's deepstack, which adds vision features at the visual
positions of its first decoder layers, used to decide whether the layout had changed from the
sequence length, and so added the pruned row's features at its old positions (a logit difference
of about 0.08 on the tiny model). The Qwen2-VL family has no deepstack; it runs here as a control.
"""

import pytest
import torch

import tiny_models as tm
import vtoken
from conftest import SUPPRESS, get_model, slice_sample
from vtoken.adapters import get_adapter
from test_scorers_e2e import last_slot as last_slots

GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)

#: sample 0: one image of 16 tokens (pruned); sample 1: two images of 8 and 4 tokens (kept whole
#: at keep=12), and both prompts 27 tokens long, so the pruned batch stays 27 long
ITEMS = [[("image", (1, 8, 8))], [("image", (1, 4, 8)), ("image", (1, 4, 4))]]
KEEP = 12




def check_batch_equals_each_sample(model, inputs, method, keep, **options):
    with vtoken.apply_pruning(model, method=method, keep=keep, **options) as h, torch.no_grad():
        out = model(**inputs).logits
        stats = h.stats
        last = last_slots(stats, inputs)
        for b in range(inputs["input_ids"].shape[0]):
            one = model(**slice_sample(inputs, b, model)).logits
            torch.testing.assert_close(out[b, last[b]], one[0, -1], rtol=1e-4, atol=1e-4)
            for st_b, st_1 in zip(stats.stages, h.stats.stages):
                assert torch.equal(st_b.kept[b], st_1.kept[0])
    return stats


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_qwen3_uniform_longest_row_kept_whole(pad_side):
    """The colleague's repro: Qwen3-VL, uniform, keep=12."""
    model = get_model("qwen3_vl")
    inputs = tm.qwen_inputs(model, ITEMS, pad_side=pad_side)
    N = inputs["input_ids"].shape[1]
    stats = check_batch_equals_each_sample(model, inputs, "uniform", KEEP)
    # the trigger: sample 0 pruned, sample 1 kept whole, the batch as long as before
    assert stats.stages[0].counts == [[12], [8, 4]]
    assert stats.positions.shape[1] == N
    assert bool((stats.positions[0] < 0).any())  # sample 0's tokens moved right, padding on the left
    if pad_side == "left":  # generation too (decode steps, then the prompt replayed without a cache)
        with vtoken.apply_pruning(model, method="uniform", keep=KEEP):
            gen = model.generate(**inputs, **GEN)
            assert torch.equal(gen, model.generate(**inputs, use_cache=False, **GEN))
            for b in range(2):
                one = model.generate(**slice_sample(inputs, b, model), **GEN)
                assert torch.equal(gen[b, -GEN["max_new_tokens"]:], one[0, -GEN["max_new_tokens"]:])


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("method,options", [("uniform", {}), ("dycoke", {}), ("divprune", {}), ("fastervlm", {}),
                                            ("fastv", {"K": 1})])
def test_batch_equals_each_sample_when_the_batch_keeps_its_length(arch, method, options):
    """Several methods (layer 0, and layer 1 between Qwen3-VL's two deepstack injections) on the
    Qwen-VL family, the longest row keeping its images whole."""
    model = get_model(arch)
    if method == "fastervlm" and get_adapter(model).vision_attention_module() is None:
        pytest.skip("the adapter does not map this model's encoder attention")
    inputs = tm.qwen_inputs(model, ITEMS)
    stats = check_batch_equals_each_sample(model, inputs, method, KEEP, **options)
    assert stats.stages[0].counts == [[12], [8, 4]]
    assert stats.positions.shape[1] == inputs["input_ids"].shape[1]
