"""``apply_pruning(model, ..., compile=True)``: the user's ``model.generate`` runs on the static engine.

The independent expectation is ``model.generate`` under the same handle with ``compile=False``
(transformers' own loop on the dynamic cache): greedy, sampling with the same seed (the same
logits processors and the same RNG draws: the CPU logits of both paths are bit-equal here), the
streamer's tokens, stopping criteria, EOS padding and ``return_dict_in_generate`` must all match.
The batch is left-padded with different visual counts (one sample without images).
"""

import pytest
import torch
from transformers.generation import BaseStreamer, StoppingCriteria, StoppingCriteriaList

import vtoken
from conftest import SUPPRESS, get_inputs, get_model
from vtoken.errors import UnsupportedCallError

T = 5
PRUNINGS = [dict(method="fastv", keep=4, K=1), dict(method="fastv", keep=1.0)]
SAMPLE = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)


def both(name, pruning, seed=None, choice=None, new_tokens=T, **gen):
    """(compile=False output, compile=True output) of ``model.generate(**inputs, **gen)``; with
    ``choice``, the compiled call must have chosen its tokens there ("graph" / "host")."""
    model = get_model(name)
    inputs = get_inputs(name, model)
    out = []
    for compile in (False, True):
        with vtoken.apply_pruning(model, compile=compile, **pruning):
            if seed is not None:
                torch.manual_seed(seed)
            out.append(model.generate(**inputs, max_new_tokens=new_tokens, suppress_tokens=SUPPRESS, **gen))
            if compile:  # the call ran on the static engine (its buffers hold the pruned prefill)
                assert choice is None or model.generate.route.token_choice == choice
                last = model.generate.route.decoder.last
                assert last["prefill_lengths"][0] == inputs["input_ids"].shape[1]
                assert pruning.get("keep") == 1.0 or len(last["prefill_lengths"]) > 1 or last["decode_stages_run"]
    return out


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("pruning", PRUNINGS, ids=["fastv", "unpruned"])
def test_greedy_generate_equals_dynamic_cache(name, pruning):
    ref, got = both(name, pruning, choice="graph", do_sample=False)
    assert ref.shape[1] == get_inputs(name, get_model(name))["input_ids"].shape[1] + T
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("pruning", PRUNINGS, ids=["fastv", "unpruned"])
def test_sampling_with_a_seed_equals_dynamic_cache(name, pruning):
    # exact by construction: top_k=1 leaves one token whatever the logits' last bits, and the sampling
    # path (temperature, top-k warper, softmax, multinomial draw) still runs
    ref, got = both(name, pruning, seed=0, choice="host", do_sample=True, temperature=0.7, top_k=1)
    assert torch.equal(got, ref) and torch.equal(got, both(name, pruning, do_sample=False)[0])
    # full sampling: the logits of the two paths differ by ~1e-7 in padded rows (other kernels over
    # the same values), too little to move a multinomial draw here; with the same seed the draws
    # (the same processors, the same RNG calls) pick the same tokens
    ref, got = both(name, pruning, seed=0, **SAMPLE)
    assert torch.equal(got, ref)
    other = both(name, pruning, seed=1, **SAMPLE)[1]
    assert not torch.equal(other, got)  # the draws depend on the seed: sampling really ran


def test_return_dict_scores_logits_and_eos_padding():
    ref0 = both("llava", PRUNINGS[0], do_sample=False)[0]
    n = get_inputs("llava", get_model("llava"))["input_ids"].shape[1]
    eos = int(ref0[0, n + 1])  # a token the first row generates: that row ends there and is padded
    gen = dict(do_sample=False, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True,
               output_scores=True, output_logits=True)
    ref, got = both("llava", PRUNINGS[0], choice="host", **gen)
    assert torch.equal(got.sequences, ref.sequences)
    assert (got.sequences[0, n + 2:] == 0).all()
    assert len(got.scores) == len(ref.scores) and len(got.logits) == len(ref.logits)
    for a, b in zip(got.scores + got.logits, ref.scores + ref.logits):  # the last bits differ (see below)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for at_least, choice in ((T, "graph"), (2, "host")):  # masks the EOS at every step: in the graph
        ref, got = both("llava", PRUNINGS[0], choice=choice, do_sample=False, eos_token_id=eos, pad_token_id=0,
                        min_new_tokens=at_least)
        assert torch.equal(got, ref)  # min_new_tokens' processor masks the EOS


def test_greedy_in_graph_pads_after_eos_and_stops_when_every_row_ended():
    """Plain greedy keeps the argmax in the captured step: EOS padding as ``generate``; a batch whose
    rows have all ended stops within CHECK_EVERY steps, and its output ends after the last EOS."""
    from vtoken.engine.eos import CHECK_EVERY

    model = get_model("llava")
    n = get_inputs("llava", model)["input_ids"].shape[1]
    ref0 = both("llava", PRUNINGS[0], do_sample=False)[0]
    eos = int(ref0[0, n + 1])  # the first row ends at its second token
    ref, got = both("llava", PRUNINGS[0], choice="graph", do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, ref) and (got[0, n + 2:] == 0).all()
    ended = [int(t) for t in ref0[:, n + 1]]  # every row's second token: as EOS, all rows end there
    long = 3 * CHECK_EVERY
    ref, got = both("llava", PRUNINGS[0], choice="graph", new_tokens=long, do_sample=False, eos_token_id=ended,
                    pad_token_id=0)
    assert torch.equal(got, ref) and got.shape[1] <= n + 2
    with vtoken.apply_pruning(model, compile=True, **PRUNINGS[0]):
        model.generate(**get_inputs("llava", model), max_new_tokens=long, suppress_tokens=SUPPRESS, do_sample=False,
                       eos_token_id=ended, pad_token_id=0)
        steps = model.generate.route.decoder.last["decode_steps"]
    assert steps == CHECK_EVERY  # the first check after every row ended, not the long - 1 steps asked for


class _Collect(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


class _StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_streamer_and_stopping_criteria():
    model = get_model("qwen2_vl")
    inputs = get_inputs("qwen2_vl", model)
    n = inputs["input_ids"].shape[1]
    streams, outs = [], []
    for compile in (False, True):
        streamer = _Collect()
        with vtoken.apply_pruning(model, compile=compile, **PRUNINGS[0]):
            outs.append(model.generate(**inputs, max_new_tokens=T, do_sample=False, suppress_tokens=SUPPRESS,
                                       streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopAfter(n + 2)])))
        streams.append(streamer)
    assert torch.equal(outs[1], outs[0]) and outs[1].shape[1] == n + 2  # stopped after 2 of the 5 tokens
    assert streams[1].ended and len(streams[1].puts) == len(streams[0].puts) == 3
    assert all(torch.equal(a, b) for a, b in zip(streams[1].puts, streams[0].puts))


def test_refused_calls_say_compile_false_and_remove_restores_generate():
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    handle = vtoken.apply_pruning(model, compile=True, **PRUNINGS[0])
    with handle:
        assert hasattr(model.generate, "route")
        for gen in (dict(num_beams=2), dict(use_cache=False), dict(do_sample=True, num_return_sequences=2)):
            with pytest.raises(UnsupportedCallError, match=r"compile=False"):
                model.generate(**inputs, max_new_tokens=2, **gen)
        with pytest.raises(UnsupportedCallError, match=r"beam search.*compile=False"):
            model.generate(**inputs, max_new_tokens=2, num_beams=2)
        with pytest.raises(UnsupportedCallError, match=r"assisted.*compile=False"):
            model.generate(**inputs, max_new_tokens=2, assistant_model=model)
    assert not hasattr(model.generate, "route") and "generate" not in model.__dict__
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False, num_beams=2).shape[1] == inputs["input_ids"].shape[1] + 2


def test_decode_time_plan_through_generate():
    ref, got = both("llava", dict(method="a2sf", keep=2), do_sample=False)
    assert torch.equal(got, ref)


def test_engine_next_token_hook_chooses_and_stops():
    from vtoken.engine import StaticDecoder

    model = get_model("llava")
    inputs = get_inputs("llava", model)
    n = inputs["input_ids"].shape[1]
    greedy = StaticDecoder(model).generate(**inputs, max_new_tokens=T, eos_token_id=[], suppress_tokens=SUPPRESS)
    calls = []

    def choose(logits):  # argmax, and stop after the third token
        calls.append(logits.dtype)
        return None if len(calls) > 3 else logits.argmax(-1)

    dec = StaticDecoder(model)
    got = dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS, next_token=choose)
    assert torch.equal(got, greedy[:, :n + 3]) and calls == [torch.float32] * 4


@pytest.mark.gpu
def test_compile_true_replays_graphs_on_gpu():
    import tiny_models as tm

    model = tm.tiny_qwen("qwen2_vl").cuda()
    inputs = {k: v.cuda() for k, v in get_inputs("qwen2_vl", model).items()}
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
        ref = model.generate(**inputs, max_new_tokens=T, do_sample=False, suppress_tokens=SUPPRESS)
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1, compile=True):
        for _ in range(2):  # the second call replays the first one's graphs
            got = model.generate(**inputs, max_new_tokens=T, do_sample=False, suppress_tokens=SUPPRESS)
            assert torch.equal(got, ref)
        last = model.generate.route.decoder.last
        assert last["cuda_graph"] and last["capture_ms"] == 0
        torch.manual_seed(0)
        a = model.generate(**inputs, max_new_tokens=T, do_sample=True, temperature=0.7, top_k=1,
                           suppress_tokens=SUPPRESS)
    assert torch.equal(a, ref)


def test_compile_dict_passes_engine_options_and_bad_ones_leave_no_hooks():
    """``compile={"fused_ops": True}``: the route's engine runs the fused decode layers (their
    PyTorch references on the CPU: the dynamic cache's tokens); an unknown key is refused before
    anything is attached."""
    from vtoken.errors import PruningConfigError

    model = get_model("llava")
    inputs = get_inputs("llava", model)
    plain_generate = model.generate
    with pytest.raises(PruningConfigError, match="compile must be"):
        vtoken.apply_pruning(model, method="fastv", keep=4, K=1, compile={"fused": True})
    assert model.generate == plain_generate and not getattr(model, "_vtoken_handle", None)
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
        ref = model.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS, do_sample=False)
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1, compile={"fused_ops": True}):
        got = model.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS, do_sample=False)
        assert model.generate.route.decoder.last["fused_ops"]
    assert torch.equal(got, ref)
