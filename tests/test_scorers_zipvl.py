"""Per-layer ZipVL end to end on tiny models: apply_pruning fills the model's depth, every layer from
K prunes by its own attention distribution (kept sets held against the paper's rule on the recorded
signals), batch == each sample alone, cache on == cache off."""

import pytest
import torch

import vtoken
from conftest import SUPPRESS, slice_sample
from test_scorers_attention import ref_zipvl
from test_scorers_e2e import last_slot, model_and_inputs
from vtoken.scorers import ZipVLScorer

OPTIONS = dict(per_layer=True, K=1, threshold=0.6)


_inputs = model_and_inputs  # the e2e suite's cases (the Qwen2-VL image batch included)


class _Recording(ZipVLScorer):
    def __init__(self, seen, **kw):
        super().__init__(**kw)
        self.seen = seen

    def select(self, sig):
        sel = super().select(sig)
        self.seen.append((sig, sel))
        return sel


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_every_layer_from_K_prunes_by_its_own_attention(arch):
    model, inputs = _inputs(arch)
    depth = len(model.model.language_model.layers)
    with vtoken.apply_pruning(model, method="zipvl", keep=1.0, **OPTIONS) as h:
        assert [st.layer for st in h.plan] == list(range(1, depth))  # num_layers filled from the model
        with torch.no_grad():
            model(**inputs)
        stats = h.stats
    assert [st.layer for st in stats.stages] == list(range(1, depth))
    shrank = False
    for b, segs in enumerate(stats.segments):
        for i, st in enumerate(stats.stages):
            prev = [seg.count for seg in segs] if i == 0 else stats.stages[i - 1].counts[b]
            assert all(1 <= c <= p for c, p in zip(st.counts[b], prev))
            shrank |= any(c < p for c, p in zip(st.counts[b], prev)) and i > 0
            assert "zipvl_count" in st.diagnostics
    assert shrank  # a later layer chose its own, smaller ratio


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl_images"])
def test_kept_sets_match_reference_on_the_recorded_signals(arch):
    model, inputs = _inputs(arch)
    seen = []
    plan = vtoken.build_plan("zipvl", 1.0, num_layers=4, **OPTIONS)  # the per-layer preset's stages, recorded
    plan = [vtoken.Stage(st.layer, _Recording(seen, threshold=st.scorer.threshold), st.keep) for st in plan]
    with vtoken.apply_pruning(model, plan=plan) as h:
        with torch.no_grad():
            model(**inputs)
        stats = h.stats
    assert len(seen) == 3
    for (sig, sel), st in zip(seen, stats.stages):
        for s in range(sig.num_segments):
            c = int(sig.counts[s])
            assert sel.keep[s].nonzero().flatten().tolist() == ref_zipvl(sig.attn_last[s, :, :c], 0.6, int(sig.budget[s]))
        assert sum(sum(c) for c in st.counts) == int(sel.keep.sum())


def _run(model, inputs):
    with vtoken.apply_pruning(model, method="zipvl", keep=0.5, **OPTIONS) as h:
        with torch.no_grad():
            return model(**inputs).logits, h.stats


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_batch_equals_each_sample_alone(arch):
    model, inputs = _inputs(arch)
    out, stats = _run(model, inputs)
    slot = last_slot(stats, inputs)
    for b in range(inputs["input_ids"].shape[0]):
        one, one_stats = _run(model, slice_sample(inputs, b, model))
        torch.testing.assert_close(out[b, slot[b]], one[0, -1], rtol=1e-4, atol=1e-4)
        if one_stats is not None:
            for st_b, st_1 in zip(stats.stages, one_stats.stages):
                assert torch.equal(st_b.kept[b], st_1.kept[0])


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_cache_equals_no_cache(arch):
    model, inputs = _inputs(arch)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)
    with vtoken.apply_pruning(model, method="zipvl", keep=0.5, **OPTIONS):
        a = model.generate(**inputs, use_cache=True, **gen)
        b = model.generate(**inputs, use_cache=False, **gen)
    assert torch.equal(a, b)
