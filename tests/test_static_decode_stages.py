"""Decode-time stages (issue 24, item 2) on the fast path: :class:`vtoken.engine.StaticDecoder`
runs A2SF / LOOK-M / ZipVL's mixed-precision KV through per-layer kept-index lists, in-step score
accumulation, merges written into its static buffers and a dequantising ``gather_attend`` read.

The independent expectation is ``model.generate(do_sample=False)`` with the same handle on the
dynamic cache (whose own correctness tests/test_decode_stages.py establishes against loops written
from the papers): same tokens, the same evicted slots at each stage, and the same dequantised
values; batches of left-padded samples with different visual counts (one without images)."""

import pytest
import torch

import vtoken
from conftest import SUPPRESS, get_inputs, get_model
from vtoken import DecodeStage
from vtoken.engine import StaticDecoder
from vtoken.errors import UnsupportedCallError
from vtoken.hooks.decode_cache import DECODE_ATTR, LOW_BITS_ATTR

T = 6
GEN = dict(do_sample=False, suppress_tokens=SUPPRESS, return_dict_in_generate=True)
PRESETS = [("a2sf", {}), ("a2sf", {"step": 2}), ("lookm", {}), ("lookm", {"step": 3, "mode": "evict"}),
           ("zipvl_kv", {"threshold": 0.9, "bits": 2})]


def both(model, inputs, method, keep, options, **decoder):
    """(generate's output on the dynamic cache, the StaticDecoder's tokens, the decoder) under one handle."""
    with torch.no_grad(), vtoken.apply_pruning(model, method=method, keep=keep, **options):
        ref = model.generate(**inputs, max_new_tokens=T, **GEN)
        dec = StaticDecoder(model, **decoder)
        got = dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS)
        dec.close()  # (fused_ops: the shared model's projection weights get their own storage back)
    return ref, got, dec


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method, options", PRESETS)
def test_static_decoder_equals_generate_and_evicts_the_same_slots(name, method, options):
    model = get_model(name)
    inputs = get_inputs(name, model)
    ref, got, dec = both(model, inputs, method, 2, options)
    assert torch.equal(got, ref.sequences)
    assert dec.last["decode_stages_run"] == 1
    dynamic = getattr(ref.past_key_values, DECODE_ATTR).evicted
    assert len(dynamic) == len(dec.stages.evicted) == 1
    for layer, evicted in dynamic[0].items():  # the same slots (scores accumulated over the same rows)
        assert torch.equal(dec.stages.evicted[0][layer], evicted), layer
        assert bool(evicted.any())
    # the engine outlives the call (compile=True keeps one): it must not keep the call's cache
    assert dec.stages.kv is None and dec.stages.scores == {}


@pytest.mark.parametrize("name, method, options", [("llava_next", "a2sf", {"step": 2}),
                                                   ("qwen3_vl", "zipvl_kv", {"threshold": 0.9})])
def test_other_adapters(name, method, options):
    model = get_model(name)
    inputs = get_inputs(name, model)
    ref, got, dec = both(model, inputs, method, 3, options)
    assert torch.equal(got, ref.sequences) and dec.last["decode_stages_run"] == 1


@pytest.mark.parametrize("method, options, decoder", [("a2sf", {"step": 2}, dict(backend="triton")),
                                                     ("lookm", {}, dict(fused_ops=True)),
                                                     ("zipvl_kv", {"threshold": 0.9}, dict(backend="triton"))])
def test_triton_gather_attend_and_fused_ops_through_the_interpreter(method, options, decoder):
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    ref, got, _ = both(model, inputs, method, 2, options, **decoder)
    assert torch.equal(got, ref.sequences)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_keep_all_equals_unpruned(name):
    model = get_model(name)
    inputs = get_inputs(name, model)
    plain = model.generate(**inputs, max_new_tokens=T, do_sample=False, suppress_tokens=SUPPRESS)
    for method, options in (("a2sf", {}), ("lookm", {}), ("zipvl_kv", {"threshold": 1.0})):
        with vtoken.apply_pruning(model, method=method, keep=1.0, **options):
            dec = StaticDecoder(model)
            assert torch.equal(dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS), plain), method
            # evict / merge at keep=1.0 record nothing; zipvl_kv at threshold 1.0 keeps every entry at full precision
            assert dec.stages is None or not any(bool(e.any()) for rec in dec.stages.evicted for e in rec.values())


@pytest.mark.parametrize("method, options", [("a2sf", {}), ("lookm", {}), ("zipvl_kv", {"threshold": 0.9})])
def test_kept_index_lists_shrink_to_the_kept_count(method, options):
    """Each layer's list holds exactly the slots the dynamic cache kept (full-precision ones in
    quantize mode), then the generated tokens' slots; the evicted slots are gone from it."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    ref, _, dec = both(model, inputs, method, 2, options)
    cache = ref.past_key_values
    n = inputs["input_ids"].shape[1]
    with vtoken.apply_pruning(model, method=method, keep=2, **options) as handle:
        layouts = handle.decode_layouts(cache)
    for layer, (positions, valid) in layouts.items():
        group = dec.groups[dec.layer_group[layer]]
        low = dec.stages.low.get(layer)
        n_low = 0 if low is None else low.length
        for b in range(positions.shape[0]):
            kept = sorted(p for p, v in zip(positions[b].tolist(), valid[b].tolist()) if v)
            lows = [] if low is None else sorted(low.idx[b, : int(n_low[b])].tolist())
            full = sorted(set(kept) - set(lows))
            base = int(group.base[b])
            assert base == len(full) < int(inputs["attention_mask"][b].sum()) or not lows and base == len(kept)
            assert sorted(group.idx[b, :base].tolist()) == full
            assert group.idx[b, base:base + T].tolist() == list(range(n, n + T))  # the generated tokens' slots
            assert int(group.count[b]) == base + T - 1


def test_quantised_read_equals_the_dynamic_dequantised_values():
    from vtoken.kernels.lowbit import dequantize_tokens

    model = get_model("qwen2_vl")
    inputs = get_inputs("qwen2_vl", model)
    ref, got, dec = both(model, inputs, "zipvl_kv", 3, {"threshold": 0.8, "bits": 4})
    assert torch.equal(got, ref.sequences)
    for i, kv in enumerate(ref.past_key_values.layers):
        store = kv.__dict__[LOW_BITS_ATTR]
        dyn_k, dyn_v = store.read()  # [B, H, Q, D], left padding
        low = dec.stages.low[i]
        li = low.idx.long()[:, None, :, None]
        for dyn, packed, scale, lo in ((dyn_k, low.k_packed, low.k_scale, low.k_lo),
                                       (dyn_v, low.v_packed, low.v_scale, low.v_lo)):
            g = lambda t: t.gather(2, li.expand(t.shape[0], t.shape[1], li.shape[2], t.shape[-1]))  # noqa: E731
            read = dequantize_tokens(g(packed), g(scale), g(lo), low.bits)
            for b in range(read.shape[0]):
                m = int(low.length[b])
                assert torch.equal(read[b, :, :m], dyn[b, :, dyn.shape[2] - m:]), (i, b)


def test_two_stages_on_chosen_layers_and_modes_per_stage():
    """Layer 0 pruned at steps 1 and 3 (scores accumulated over the steps before each), layer 1 at
    step 3 only; then a merge stage on one layer and a quantize stage on another."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    plans = ([DecodeStage("a2sf", 4, step=1, layers=[0]), DecodeStage("a2sf", 2, step=3, layers=[0, 1])],
             [DecodeStage("lookm", 5, layers=[1], mode="merge"), DecodeStage("zipvl_kv", 2, step=2, layers=[0],
                                                                             mode="quantize", bits=4)])
    for plan in plans:
        with torch.no_grad(), vtoken.apply_pruning(model, plan=plan):
            ref = model.generate(**inputs, max_new_tokens=T, do_sample=False, suppress_tokens=SUPPRESS)
            dec = StaticDecoder(model)
            assert torch.equal(dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS), ref)
        assert dec.last["decode_stages_run"] == 2


def test_refusals_are_clear():
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    with vtoken.apply_pruning(model, plan=[vtoken.Stage(2, "fastv", 12), DecodeStage("a2sf", 3)]):
        with pytest.raises(UnsupportedCallError, match="prefill"):
            StaticDecoder(model).generate(**inputs, max_new_tokens=2)
    with vtoken.apply_pruning(model, method="a2sf", keep=3):
        with pytest.raises(UnsupportedCallError, match="prefill_batch"):
            StaticDecoder(model).generate(**inputs, max_new_tokens=2, prefill_batch=1)


def test_kept_rows_equal_the_dynamic_step_rows():
    from vtoken.engine.static_stages import kept_rows
    from vtoken.hooks.probe import step_rows

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, L = 2, 4, 2, 8, 11
    q, k = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    held = torch.rand(B, L, generator=g) > 0.3
    held[:, -1] = True  # the query's own slot
    idx = torch.argsort((~held).to(torch.int8), dim=1, stable=True).to(torch.int32)
    got = kept_rows(q, k, idx, held.sum(1), 0.3)
    torch.testing.assert_close(got, step_rows(q, k, held, 0.3)[:, 0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_attention_row_equals_kept_rows(backend):
    """What the decode step folds into the scores, the row ``gather_attend`` returns with the
    attention (its own logits and log-sum-exp), equals :func:`kept_rows`' recomputation from the keys
    (bit for bit on the reference; Triton through the interpreter on the CPU)."""
    import os

    from vtoken.engine.static_stages import kept_rows, to_slots
    from vtoken.kernels import HAS_TRITON, gather_attend

    if backend == "triton" and not (HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET"))):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, D, L, K = 3, 8, 2, 16, 40, 24
    q, k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    idx = torch.stack([torch.randperm(L, generator=g)[:K].sort().values for _ in range(B)]).to(torch.int32)
    count = torch.tensor([K, 7, 0])
    _, row = gather_attend(q, k, v, idx, count, scale=0.3, return_row=True, backend=backend)
    got, want = to_slots(row.sum(dim=1), idx, L), kept_rows(q, k, idx, count, 0.3)
    if backend == "torch":
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bench_static_rows_read_fewer_kv_bytes():
    """``python -m vtoken.bench.decode_kv --engine static`` (the GPU measurement) on the CPU: the
    static buffers keep their size, the bytes the last step reads shrink by the evicted entries."""
    from vtoken.bench.decode_kv import measure_static

    model = get_model("llava")
    inputs = get_inputs("llava", model)
    rows = {r["method"]: r for r in measure_static(model, inputs, ("a2sf", "zipvl_kv"), keep=2, new_tokens=3,
                                                   repeats=1)}
    assert rows["a2sf"]["kv_bytes"] == rows["none"]["kv_bytes"]
    assert rows["a2sf"]["kv_read_mb"] < rows["zipvl_kv"]["kv_read_mb"] < rows["none"]["kv_read_mb"]


@pytest.mark.gpu
@pytest.mark.parametrize("fused_ops", [False, True])
def test_cuda_graphs_per_phase_equal_generate_on_gpu(fused_ops):
    """On CUDA the decode step is captured once per phase between stages (after each stage's
    eviction, with the accumulation of the next one) and replayed; a phase with fewer than 3 steps
    left runs eagerly. A stage at step 2 of 8 steps: a captured phase before it, one after it;
    zipvl_kv: the low-bit Triton read inside the captured step."""
    import tiny_models as tm

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tm.tiny_qwen("qwen2_vl").cuda()
    inputs = {k: v.cuda() for k, v in get_inputs("qwen2_vl", model).items()}
    steps = 8
    for method, options in (("a2sf", {"step": 2}), ("lookm", {}), ("zipvl_kv", {"threshold": 0.9, "step": 5})):
        with torch.no_grad(), vtoken.apply_pruning(model, method=method, keep=2, **options):
            ref = model.generate(**inputs, max_new_tokens=steps, **GEN)
            eager = StaticDecoder(model, cuda_graph=False, fused_ops=fused_ops).generate(
                **inputs, max_new_tokens=steps, suppress_tokens=SUPPRESS)
            dec = StaticDecoder(model, fused_ops=fused_ops)
            got = dec.generate(**inputs, max_new_tokens=steps, suppress_tokens=SUPPRESS)
            assert dec.last["cuda_graph"] and dec.last["capture_ms"] > 0 and dec.last["decode_stages_run"] == 1
            dynamic = getattr(ref.past_key_values, DECODE_ATTR).evicted[0]
            for layer, evicted in dynamic.items():
                assert torch.equal(dec.stages.evicted[0][layer], evicted), (method, layer)
        assert torch.equal(eager, ref.sequences) and torch.equal(got, ref.sequences), method


@pytest.mark.parametrize("method, options", [("a2sf", {"step": 3}), ("lookm", {}), ("zipvl_kv", {"threshold": 0.9})])
def test_decode_steps_make_no_host_syncs(method, options, monkeypatch):
    """Inside a decode step (what a CUDA graph captures) no op waits for the device: the score
    accumulation of a stage to come, the edited lists and the low-bit read included (the sync ops
    counted on the CPU with a dispatch mode, as tests/test_host_syncs.py does); the stage itself
    runs between steps."""
    import vtoken.engine.static_decode as static_decode
    from conftest import SyncCounter

    counter, loop = SyncCounter(), static_decode.decode_loop
    counter.on = False  # counted inside the decode steps only

    def counted(step, *args, **kwargs):
        def wrapped():
            counter.on = True
            try:
                step()
            finally:
                counter.on = False
        return loop(wrapped, *args, **kwargs)

    monkeypatch.setattr(static_decode, "decode_loop", counted)
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    with counter:
        ref, got, dec = both(model, inputs, method, 2, options)
    assert torch.equal(got, ref.sequences) and dec.last["decode_stages_run"] == 1
    assert not counter.found, dict(counter.found)


class _ReplayByRunning:
    """A stand-in for a captured CUDA graph on the CPU: ``replay`` runs the step."""

    def __init__(self, fn):
        self.replay = fn


@pytest.mark.parametrize("method, options", [("a2sf", {"step": 2}), ("zipvl_kv", {"threshold": 0.9, "step": 4})])
def test_per_phase_capture_restores_what_its_warm_ups_advanced(method, options, monkeypatch):
    """The decode loop's graph bookkeeping on the CPU: a stand-in capture runs the step three times
    (as ``_capture``'s two warm-ups and more: the step counter, the next token and the scores
    advance) and replays by running it; the tokens still equal generate's, so the loop restores
    what the warm-ups advanced, captures one graph per phase and runs the short last phase eagerly."""
    import vtoken.engine.static_decode as static_decode

    loop, captured = static_decode.decode_loop, []

    def capture(fn):
        for _ in range(3):
            fn()
        captured.append(fn)
        return _ReplayByRunning(fn)

    monkeypatch.setattr(static_decode, "decode_loop", lambda step, steps, stages, _capture, *rest: loop(
        step, steps, stages, capture, *rest))
    model = get_model("qwen2_vl")
    inputs = get_inputs("qwen2_vl", model)
    with torch.no_grad(), vtoken.apply_pruning(model, method=method, keep=2, **options):
        ref = model.generate(**inputs, max_new_tokens=8, **GEN)
        got = StaticDecoder(model).generate(**inputs, max_new_tokens=8, suppress_tokens=SUPPRESS)
    assert torch.equal(got, ref.sequences)
    assert len(captured) == 2  # before the stage, after it (7 steps: the phase after step 4 has 3 left, captured)
    # compile=True: the token is chosen after each replay, outside the captured step (the engine's next_token)
    with torch.no_grad(), vtoken.apply_pruning(model, method=method, keep=2, compile=True, **options):
        routed = model.generate(**inputs, max_new_tokens=8, **GEN)
    assert torch.equal(routed.sequences, ref.sequences) and len(captured) == 4
