"""Readmit stages on candidate buffers (hooks/decode_readmit.py): a plan of readmit stages only
(the ``lazyllm`` preset) keeps each layer's candidates in one buffer in original position order
instead of merging a stash with the live slots, and reads the device once per stage. Invariants:
the same tokens, scores, live cache (bit for bit), layouts, stash and evicted counts as the
stash-and-merge path (``DecodeRuntime.fast_readmit = False``, the path of plans that mix readmit
with other stages); at most one host sync per stage once the first stage has run.
"""

import pytest
import torch

import vtoken
from conftest import SyncCounter, TransferCounter, get_inputs
from test_decode_stages import GEN, _model
from vtoken.hooks.decode_cache import DECODE_ATTR
from vtoken.hooks.decode_cache import compact
from vtoken.hooks import held_bytes


def _run(model, inputs, options, fast, steps):
    """generate with lazyllm on one path -> (output, per stage: (stash, live sizes) right after it)."""
    after = []
    with torch.no_grad(), vtoken.apply_pruning(model, method="lazyllm", **options) as handle:
        runtime = handle.decode_runtime
        runtime.fast_readmit = fast
        original = runtime.evict

        def spy(cache, state, index):
            original(cache, state, index)
            after.append({l: tuple(getattr(s, f) for f in ("keys", "values", "positions", "valid"))
                          for l, s in state.stash.items()})

        runtime.evict = spy
        out = model.generate(**inputs, max_new_tokens=steps, **GEN)
        layouts = handle.decode_layouts(out.past_key_values)
    return out, after, layouts


@pytest.mark.parametrize("name, options", [("llava", {"keep": 3, "until": 5}),
                                           ("qwen2_vl", {"keep": 2, "until": 6, "every": 2, "layers": (1, 3)}),
                                           ("llava_next", {"keep": 4, "until": 4})])
def test_candidate_buffers_equal_the_stash_merge_path_bit_for_bit(name, options):
    model = _model(name, attn="sdpa")
    inputs = get_inputs(name, model)  # a batch, left padding, images of different sizes
    steps = 7
    ref, ref_stash, ref_layouts = _run(model, inputs, options, False, steps)
    out, stash, layouts = _run(model, inputs, options, True, steps)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))
    for a, b in zip(out.past_key_values.layers, ref.past_key_values.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    for layer in ref_layouts:
        assert all(torch.equal(x, y) for x, y in zip(layouts[layer], ref_layouts[layer])), layer
    state, ref_state = (getattr(o.past_key_values, DECODE_ATTR) for o in (out, ref))
    assert state.offsets == ref_state.offsets
    assert [r.keys() for r in state.evicted] == [r.keys() for r in ref_state.evicted]
    for rec, ref_rec in zip(state.evicted, ref_state.evicted):
        for layer, ev in rec.items():
            assert torch.equal(ev.sum(1), ref_rec[layer].sum(1)), layer
    assert len(stash) == len(ref_stash) and any(stash)
    for got, want in zip(stash, ref_stash):
        assert got.keys() == want.keys()
        for layer in want:
            assert all(torch.equal(x, y) for x, y in zip(got[layer], want[layer])), layer


def test_lazyllm_stages_read_the_device_once():
    """Host syncs inside each stage: the first builds the per-image selection index; every later
    one (a decode step's eviction over every layer) reads the device once, whatever the layer
    count (the stash-and-merge path: about ten per layer)."""
    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model)
    syncs = []
    with torch.no_grad(), vtoken.apply_pruning(model, method="lazyllm", keep=3, until=5) as handle:
        runtime = handle.decode_runtime
        original = runtime.evict

        def counted(cache, state, index):
            ops, copies = SyncCounter(), TransferCounter()
            with copies, ops:
                original(cache, state, index)
            syncs.append(ops.total + sum(copies.found.values()))

        runtime.evict = counted
        model.generate(**inputs, max_new_tokens=6, **GEN)
    assert len(syncs) == 5
    assert syncs[0] <= 3 and all(s == 1 for s in syncs[1:]), syncs


def test_compact_equals_the_nonzero_layout_with_and_without_counts():
    """compact without reading the device when the counts are given: the same take / valid as
    the nonzero-based layout (padding on the left, take 0 there)."""
    g = torch.Generator().manual_seed(1)
    kept = torch.rand(4, 13, generator=g) > 0.5
    kept[2] = False
    count = kept.sum(1)
    P = int(count.max())
    want = torch.zeros(4, P, dtype=torch.long)
    for b in range(4):
        slots = kept[b].nonzero().squeeze(1)
        want[b, P - len(slots):] = slots
    valid = torch.arange(P).view(1, P) >= (P - count).view(4, 1)
    for take, got_valid in (compact(kept), compact(kept, count, P)):
        assert torch.equal(take, want) and torch.equal(got_valid, valid)


@pytest.mark.parametrize("fast", [True, False])
def test_held_bytes_counts_the_readmit_stash_apart_from_the_live_kv(fast):
    """vtoken.hooks.held_bytes: ``kv`` is the live keys + values; ``readmit`` holds at least every
    entry a readmit plan evicted and may bring back (so a bench cannot report LazyLLM's shrunken live
    cache as memory freed); a plan that never re-admits holds nothing besides."""
    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model)
    with torch.no_grad(), vtoken.apply_pruning(model, method="lazyllm", keep=3, until=9) as handle:
        handle.decode_runtime.fast_readmit = fast
        out = model.generate(**inputs, max_new_tokens=5, **GEN)
    cache = out.past_key_values
    held = held_bytes(cache)
    assert held["kv"] == sum(t.numel() * t.element_size() for l in cache.layers for t in (l.keys, l.values))
    state = getattr(cache, DECODE_ATTR)
    assert state.stash  # stages still to come (until=9 > 5 steps): the evicted entries are held
    layer0 = cache.layers[0]
    entry = 2 * layer0.keys.shape[1] * layer0.keys.shape[3] * layer0.keys.element_size()  # key + value, one token
    evicted = 0
    for layer in state.stash:
        live = state.layers[layer].valid.sum(1)  # visual + text slots kept, per row
        seen = state.orig_valid.sum(1)  # every prompt slot the layer ever had, per row
        evicted += int((seen - live).clamp(min=0).sum())
    assert evicted > 0 and held["readmit"] >= evicted * entry
    with torch.no_grad(), vtoken.apply_pruning(model, method="a2sf", keep=3):
        out = model.generate(**inputs, max_new_tokens=5, **GEN)
    assert held_bytes(out.past_key_values)["readmit"] == 0
