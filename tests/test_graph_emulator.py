"""CUDA-graph semantics on the CPU (vtoken.engine.graph_emulator) and the engine's captures under it.

A captured graph replays device work only: anything its closure decided in Python is frozen at the
capture. The engine's captures (the vision tower, the prefill tail, the decode step, the phases
between decode-time stages) were checked only by the GPU tests; ``cuda_graph="emulate"`` runs the
same captures and replays on the CPU. The independent expectation is transformers' ``generate`` on
the dynamic cache with the same handle, for a second input of the same shape (new pixels, so new
kept tokens) replayed on the first call's session.
"""

import pytest
import torch

import tiny_models as tm
import vtoken
from conftest import SUPPRESS, get_inputs, get_model
from vtoken.engine import StaticDecoder
from vtoken.engine.graph_emulator import CaptureError, EmulatedGraph, emulated_capture
from vtoken.errors import PruningConfigError

T = 5
GEN = dict(max_new_tokens=T, do_sample=False, suppress_tokens=SUPPRESS)


def test_replay_recomputes_device_work_and_freezes_python():
    x, out, count = torch.arange(6.0), torch.zeros(3), torch.zeros(())
    calls = []

    def fn():
        calls.append(1)
        scale = float(len(calls))                  # decided in Python: frozen at the capture
        view = x.view(2, 3)                        # a view: aliases x, sees new contents
        out.copy_(view.sum(0) * scale + 1)
        count.add_(1)                              # in place: re-run by every replay

    graph = emulated_capture(fn, warmups=1)        # one eager run, then the capture (the 2nd call)
    assert len(calls) == 2 and count.item() == 2
    x.copy_(torch.arange(6.0) * 10)
    graph.replay()
    assert len(calls) == 2                         # no Python ran
    assert torch.equal(out, (x.view(2, 3).sum(0) * 2 + 1))  # new x, the captured scale
    assert count.item() == 3


@pytest.mark.parametrize("read", [lambda t: t.sum().item(), lambda t: t.nonzero(), lambda t: t[t > 1],
                                  lambda t: t.tolist(), lambda t: bool(t.any()), lambda t: t.cpu()])
def test_reading_a_device_value_on_the_host_is_refused(read):
    t = torch.arange(4.0)
    with pytest.raises(CaptureError):
        EmulatedGraph().capture(lambda: read(t))


def test_the_option_is_checked():
    with pytest.raises(PruningConfigError, match="emulate"):
        StaticDecoder(get_model("llava"), cuda_graph="yes")


def _second_input(inputs: dict) -> dict:
    """The same shapes with other pixels (other kept tokens, the same host plan)."""
    g = torch.Generator().manual_seed(7)
    return {**inputs, "pixel_values": torch.randn(inputs["pixel_values"].shape, generator=g,
                                                  dtype=inputs["pixel_values"].dtype)}


PLANS = {"none": None, "fastv": dict(method="fastv", keep=4, K=1), "divprune": dict(method="divprune", keep=4),
         "two_stage": dict(plan=[vtoken.Stage(1, "fastv", 6), vtoken.Stage(3, "random", 3)])}


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("fused", [False, True])
def test_emulated_graphs_replay_new_inputs_like_generate(name, plan, fused):
    """The first call captures (tower where graphable, tail, decode step); the second, with new
    pixels, replays all of them on the kept session: both equal generate's tokens."""
    model = get_model(name)
    first = get_inputs(name, model)
    handle = vtoken.apply_pruning(model, **PLANS[plan]) if PLANS[plan] else None
    dec = StaticDecoder(model, cuda_graph="emulate", fused_ops=fused)
    try:
        for i, inputs in enumerate((first, _second_input(first))):
            ref = model.generate(**inputs, **GEN)
            got = dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS)
            assert torch.equal(got, ref), (i, got[:, -T:].tolist(), ref[:, -T:].tolist())
            assert dec.last["cuda_graph"] and dec.last["session_reused"] is (i == 1)
            assert (dec.last["capture_ms"] > 0) is (i == 0)
            if name == "llava":
                assert dec.last["vision_tower_graph"] == "captured"
    finally:
        dec.close()
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("new_tokens", [2, 3])
def test_a_short_generation_leaves_room_for_the_step_capture(new_tokens):
    """The decode step's capture runs it three times (two warm-ups), each writing the next token's slot:
    with fewer than four new tokens the buffers must still hold those writes (before: an index past
    the end; on a GPU a device-side assert)."""
    model = get_model("llava")
    inputs = get_inputs("llava", model, variant="single")
    dec = StaticDecoder(model, cuda_graph="emulate")
    got = dec.generate(**inputs, max_new_tokens=new_tokens, suppress_tokens=SUPPRESS)
    ref = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, suppress_tokens=SUPPRESS)
    assert torch.equal(got, ref) and dec.last["cuda_graph"]


def test_emulated_graphs_with_a_host_token_choice():
    """``next_token`` (the token chosen outside the graph) replays the step that writes logits."""
    model = get_model("llava")
    first = get_inputs("llava", model)
    argmax = {"next_token": lambda logits: logits.argmax(-1)}
    dec = StaticDecoder(model, cuda_graph="emulate")
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
        for inputs in (first, _second_input(first)):
            ref = model.generate(**inputs, max_new_tokens=T, do_sample=False, suppress_tokens=SUPPRESS, eos_token_id=[])
            got = dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS, eos_token_id=[], **argmax)
            assert torch.equal(got, ref)


@pytest.mark.parametrize("method, options", [("a2sf", {"step": 2}), ("lookm", {}), ("zipvl_kv", {"threshold": 0.9, "bits": 2})])
def test_emulated_graphs_between_decode_stages(method, options):
    """Decode-time stages: each phase between stages captured once (``decode_loop``) and replayed."""
    model = tm.tiny_qwen("qwen2_vl")
    inputs = get_inputs("qwen2_vl", model)
    n = 8  # enough steps for the phases' captures (a phase with fewer than 3 steps left runs eagerly)
    with torch.no_grad(), vtoken.apply_pruning(model, method=method, keep=2, **options):
        ref = model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=SUPPRESS, eos_token_id=[],
                             pad_token_id=tm.PAD_ID)
        dec = StaticDecoder(model, cuda_graph="emulate")
        got = dec.generate(**inputs, max_new_tokens=n, suppress_tokens=SUPPRESS, eos_token_id=[])
    assert torch.equal(got, ref) and dec.last["decode_stages_run"] >= 1 and dec.last["capture_ms"] > 0


def test_generate_route_replays_emulated_graphs():
    """``apply_pruning(..., compile={"cuda_graph": "emulate"})``: ``model.generate`` through the engine's
    emulated graphs equals ``generate`` with the plain handle, the second input replaying the first's."""
    model = get_model("qwen2_5_vl")
    first = get_inputs("qwen2_5_vl", model)
    handle = vtoken.apply_pruning(model, method="fastv", keep=4, K=1, compile={"cuda_graph": "emulate", "fused_ops": True})
    got, reused = [], []
    with handle:
        for inputs in (first, _second_input(first)):
            got.append(model.generate(**inputs, **GEN))
            last = model.generate.route.decoder.last
            assert last["cuda_graph"] and last["fused_ops"]
            reused.append(last["session_reused"])
    assert reused == [False, True]
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
        refs = [model.generate(**inputs, **GEN) for inputs in (first, _second_input(first))]
    assert all(torch.equal(g, r) for g, r in zip(got, refs))


def _other_text(inputs: dict, model) -> dict:
    """The same prompt layout (visual tokens where they were, the same padding) with other text tokens."""
    from vtoken.adapters.base import visual_token_ids

    ids = inputs["input_ids"].clone()
    text = ~torch.isin(ids, torch.tensor(visual_token_ids(model.config))) & inputs["attention_mask"].bool()
    ids[text] = (ids[text] + 1) % 50 + 3  # (ids 3..52: below every special token of the tiny models)
    return {**inputs, "input_ids": ids}


@pytest.mark.parametrize("fused", [False, True])
def test_graphed_prefill_head_replays_per_prompt_layout(fused):
    """``graph_prefill="all"``: LLaVA's whole batch-1 pruned prefill (tower, the layers before the
    stage, the scoring, the gather) is captured once per prompt layout; new pixels and new text in
    the same layout replay it, and every call equals generate's tokens."""
    model = get_model("llava")
    first = get_inputs("llava", model, variant="single")
    dec = StaticDecoder(model, cuda_graph="emulate", graph_prefill="all", fused_ops=fused)
    try:
        with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
            shifted = {**first, "input_ids": first["input_ids"].roll(1, dims=1)}  # the image one token later
            for inputs, state in ((first, "captured"), (_second_input(first), "replayed"),
                                  (_other_text(first, model), "replayed"), (shifted, "captured"), (first, "replayed")):
                ref = model.generate(**inputs, **GEN)
                got = dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS)
                assert torch.equal(got, ref) and dec.last["head_graph"] == state, dec.last["head_graph"]
        with vtoken.apply_pruning(model, method="fastv", keep=3, K=1):  # another handle: another graph
            ref = model.generate(**first, **GEN)
            got = dec.generate(**first, max_new_tokens=T, suppress_tokens=SUPPRESS)
            assert torch.equal(got, ref) and dec.last["head_graph"] == "captured"
    finally:
        dec.close()


@pytest.mark.parametrize("name, variant, where", [("llava_next", "single", "image_size_to_num_patches"),
                                                  ("qwen2_vl", "single", "prefill_plan.py"),
                                                  ("llava", "batch", "masking_utils.py")])
def test_a_head_that_reads_the_device_runs_eagerly(name, variant, where):
    """Where the head reads a device value on the host (LLaVA-NeXT's image sizes, Qwen's grids,
    transformers' test of a padded mask) it cannot be captured: the call runs it eagerly, says why,
    and gives generate's tokens."""
    model = get_model(name)
    inputs = get_inputs(name, model, variant=variant)
    dec = StaticDecoder(model, cuda_graph="emulate", graph_prefill="all")
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
        ref = model.generate(**inputs, **GEN)
        for _ in range(2):
            got = dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS)
            assert torch.equal(got, ref)
            assert dec.last["head_graph"].startswith("CaptureError") and where in dec.last["head_graph"]
    dec.close()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fastv", "divprune"])
def test_graphed_prefill_head_on_gpu(method):
    """The same on CUDA: a real capture of LLaVA's batch-1 pruned prefill head (DivPrune's picks in
    the Triton kernel), replayed for new pixels, generate's tokens every time."""
    model = tm.tiny_llava().cuda()
    first = {k: v.cuda() for k, v in get_inputs("llava", model, variant="single").items()}
    dec = StaticDecoder(model, graph_prefill="all", fused_ops=True)
    with vtoken.apply_pruning(model, method=method, keep=4):
        for inputs, state in ((first, "captured"), ({**first, "pixel_values": torch.randn_like(first["pixel_values"])},
                                                   "replayed")):
            ref = model.generate(**inputs, **GEN)
            got = dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS)
            assert torch.equal(got, ref) and dec.last["head_graph"] == state, dec.last["head_graph"]
    dec.close()
