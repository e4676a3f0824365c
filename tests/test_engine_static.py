"""StaticDecoder (static KV buffers + kept-index lists + gather_attend) against model.generate.

The independent expectation is transformers' own greedy ``generate`` on the same model, unpatched
or with the same pruning handle (whose own correctness the invariant tests establish): the static
path must produce the same tokens for every adapter, with a batch of left-padded samples with
different visual-token counts (one without images), so ragged kept counts are exercised.
"""

import pytest
import torch

import vtoken
from conftest import SUPPRESS, get_inputs, get_model
from vtoken.engine import StaticDecoder
from vtoken.engine.static_decode import _kept_index

T = 5
GEN = dict(max_new_tokens=T, do_sample=False, suppress_tokens=SUPPRESS)


def static(model, inputs, **kw):
    dec = StaticDecoder(model, **kw)
    try:
        return dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS), dec
    finally:
        dec.close()  # the shared test model's merged projection weights (fused_ops) get their storage back


@pytest.mark.parametrize("graph_prefill", [False, True])
def test_unpruned_static_equals_generate(arch, graph_prefill):
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    got, dec = static(model, inputs, graph_prefill=graph_prefill)
    assert torch.equal(got, model.generate(**inputs, **GEN))
    assert len(dec.last["prefill_lengths"]) == 1
    if graph_prefill and arch != "qwen3_vl":  # the tail is every decoder layer (deepstack: no split)
        assert dec.last["graph_prefill_from_layer"] == 0


@pytest.mark.parametrize("plan", ["fastv", "two_stage"])
@pytest.mark.parametrize("graph_prefill", [False, True])
def test_pruned_static_equals_pruned_generate(arch, plan, graph_prefill):
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    unpruned_kv = static(model, inputs)[1].last["kv_bytes"]
    if plan == "fastv":
        handle = vtoken.apply_pruning(model, method="fastv", keep=4, K=1)
    else:
        handle = vtoken.apply_pruning(model, plan=[vtoken.Stage(1, "fastv", 6), vtoken.Stage(3, "random", 3)])
    with handle:
        ref = model.generate(**inputs, **GEN)
        got, dec = static(model, inputs, graph_prefill=graph_prefill)
        kept = handle.stats
    assert torch.equal(got, ref)
    lengths = dec.last["prefill_lengths"]
    assert len(lengths) == len(handle.plan) + 1 and lengths == sorted(lengths, reverse=True)
    assert lengths[0] == inputs["input_ids"].shape[1]
    assert dec.last["kv_bytes"] < unpruned_kv
    assert kept is not None
    if graph_prefill and arch != "qwen3_vl":
        assert dec.last["graph_prefill_from_layer"] == handle.plan[-1].layer


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_chunked_prefill_equals_one_prefill(name):
    """prefill_batch: the batch is prefilled in chunks into one set of static buffers."""
    import tiny_models as tm

    model = get_model(name)
    if name == "llava":
        inputs = tm.llava_inputs(model, [3, 6, 5], [1, 1, 1], [4, 2, 3])
    else:
        inputs = tm.qwen_inputs(model, [[("image", (1, 8, 8))]] * 3)
        inputs["input_ids"][0, :2] = 0  # different text lengths: left padding in one sample
        inputs["attention_mask"][0, :2] = 0
    with vtoken.apply_pruning(model, method="fastv", keep=0.3, K=1):
        ref = model.generate(**inputs, **GEN)
        dec = StaticDecoder(model)
        got = dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS, prefill_batch=2)
    assert dec.last["prefill_chunks"] == 2
    assert torch.equal(got, ref)
    mixed = get_inputs("llava", get_model("llava"))  # samples with 1, 2 and 0 images
    with pytest.raises(vtoken.PruningConfigError, match="same visual inputs"):
        StaticDecoder(get_model("llava")).generate(**mixed, max_new_tokens=2, prefill_batch=1)


def test_triton_backend_through_the_interpreter():
    """The Triton gather_attend kernel (interpreted on the CPU) inside the static decode steps."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
        ref = model.generate(**inputs, **GEN)
        got, _ = static(model, inputs, backend="triton")
    assert torch.equal(got, ref)


def test_kept_index_lists_valid_slots_then_future_slots():
    valid = torch.tensor([[False, True, False, True], [True, True, True, True], [False, False, False, True]])
    idx, base = _kept_index(valid, 2)
    assert base.tolist() == [2, 4, 1]
    assert idx[0, :4].tolist() == [1, 3, 4, 5]
    assert idx[1, :6].tolist() == [0, 1, 2, 3, 4, 5]
    assert idx[2, :3].tolist() == [3, 4, 5]


def test_eos_pads_finished_rows_and_stops_like_generate():
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    free = model.generate(**inputs, max_new_tokens=T, do_sample=False, suppress_tokens=SUPPRESS)
    eos = int(free[0, -T + 1])  # the second token of row 0 becomes its EOS
    ref = model.generate(**inputs, max_new_tokens=T, do_sample=False, suppress_tokens=SUPPRESS,
                         eos_token_id=eos, pad_token_id=0)
    got = StaticDecoder(model).generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS,
                                        eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, ref)
    assert (got[0, -T + 2:] == 0).all()


def test_errors_are_clear():
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    with pytest.raises(vtoken.PruningConfigError, match="max_new_tokens"):
        StaticDecoder(model).generate(**inputs, max_new_tokens=0)
    with pytest.raises(vtoken.PruningConfigError, match="input_ids"):
        StaticDecoder(model).generate(max_new_tokens=2)
    if not torch.cuda.is_available():
        with pytest.raises(vtoken.PruningConfigError, match="cuda_graph=True needs"):
            StaticDecoder(model, cuda_graph=True).generate(**inputs, max_new_tokens=2)
    with pytest.raises(vtoken.UnsupportedModelError):
        StaticDecoder(torch.nn.Linear(2, 2))


@pytest.mark.gpu
def test_cuda_graph_equals_eager_static_decode_on_gpu():
    import tiny_models as tm

    model = tm.tiny_qwen("qwen2_vl").cuda()
    inputs = {k: v.cuda() for k, v in get_inputs("qwen2_vl", model).items()}
    for plan in (dict(method="fastv", keep=4, K=1), dict(plan=[vtoken.Stage(1, "fastv", 6), vtoken.Stage(3, "random", 3)])):
        with vtoken.apply_pruning(model, **plan):
            ref = model.generate(**inputs, **GEN)
            eager, _ = static(model, inputs, cuda_graph=False, graph_prefill=False)
            dec = StaticDecoder(model)  # graphs for the prefill tail and the decode step
            first = dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS)
            assert dec.last["cuda_graph"] and dec.last["graph_prefill_from_layer"] == model._vtoken_handle.plan[-1].layer
            assert dec.last["capture_ms"] > 0
            again = dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS)  # replays the cached graphs
            assert dec.last["capture_ms"] == 0
        assert torch.equal(eager, ref) and torch.equal(first, ref) and torch.equal(again, ref)
    unpruned = StaticDecoder(model)
    assert torch.equal(unpruned.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS), model.generate(**inputs, **GEN))
    assert unpruned.last["graph_prefill_from_layer"] == 0


@pytest.mark.gpu
def test_vision_tower_graph_replays_on_gpu():
    """LLaVA's CLIP tower replayed as a CUDA graph: same tokens as generate, for new pixels too."""
    import tiny_models as tm

    model = tm.tiny_llava().cuda()
    dec = StaticDecoder(model)
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
        for seed in (0, 1):
            inputs = {k: v.cuda() for k, v in tm.llava_inputs(model, [3, 6, 5], [1, 1, 1], [4, 2, 3], seed=seed).items()}
            got = dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS)
            assert dec.last["vision_tower_graph"] == "captured"
            assert torch.equal(got, model.generate(**inputs, **GEN))


@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("pruned", [False, True])
def test_fused_ops_decode_equals_generate(name, pruned):
    """fused_ops=True (vtoken.engine.fused_decode) with the PyTorch references computes what the
    model's own layers compute: the same tokens as generate, through the fused layers at every step."""
    from vtoken.engine import fused_decode

    model = get_model(name)
    inputs = get_inputs(name, model)
    handle = vtoken.apply_pruning(model, method="fastv", keep=4, K=1) if pruned else None
    try:
        ref = model.generate(**inputs, **GEN)
        plain, _ = static(model, inputs)
        calls = []
        real = fused_decode.run_layers

        def counted(*a, **k):
            calls.append(1)
            return real(*a, **k)

        fused_decode.run_layers = counted
        try:
            got, dec = static(model, inputs, fused_ops=True)
        finally:
            fused_decode.run_layers = real
    finally:
        if handle is not None:
            handle.remove()
    assert torch.equal(plain, ref) and torch.equal(got, ref)
    assert dec.last["fused_ops"] and len(calls) == T - 1  # every decode step went through the fused layers
    assert dec.last["merged_projections"] == 2 * len(list(model.model.language_model.layers))  # q/k/v, gate/up


@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("pruned", [False, True])
def test_fused_prefill_tail_equals_generate(name, pruned):
    """With fused_ops the split prefill's tail (the layers after the last stage) runs with the fused
    element-wise kernels too, exactly (PyTorch references): the same tokens as generate; the tail
    went through the fused layers where each token has one rotary table (LLaVA), the model's
    own layers where a rotary embedding gives per-component M-RoPE tables (Qwen2-VL on some
    transformers versions; others merge them into one table per token)."""
    from vtoken.engine import prefill

    model = get_model(name)
    inputs = get_inputs(name, model)
    handle = vtoken.apply_pruning(model, method="fastv", keep=4, K=1) if pruned else None
    calls = []
    real = prefill.run_prefill_layers

    def counted(*a, **k):
        calls.append(k["first"])
        return real(*a, **k)

    try:
        ref = model.generate(**inputs, **GEN)
        prefill.run_prefill_layers = counted
        got, dec = static(model, inputs, fused_ops=True, graph_prefill=True)
    finally:
        prefill.run_prefill_layers = real
        if handle is not None:
            handle.remove()
    assert torch.equal(got, ref)
    stop = dec.last["graph_prefill_from_layer"]
    assert stop == (1 if pruned else 0)
    assert calls == [stop] or (name == "qwen2_vl" and calls == [])


def _tiny_granite_next(embedding_multiplier):
    """A tiny LLaVA-NeXT whose language model is Granite (Granite-Vision's layout): Llama's
    sub-modules, but residual branches, embeddings and attention logits scaled."""
    import tiny_models as tm
    import transformers as T

    torch.manual_seed(0)
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=16, patch_size=4, projection_dim=32)
    text = T.GraniteConfig(**tm.TEXT, pad_token_id=tm.PAD_ID, residual_multiplier=0.22,
                           embedding_multiplier=embedding_multiplier, attention_multiplier=0.125, logits_scaling=1.0)
    cfg = T.LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tm.IMAGE_ID,
                            image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]], vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
    cfg.text_config.tie_word_embeddings = False
    model = T.LlavaNextForConditionalGeneration(cfg).eval()
    return model, tm.llava_next_inputs(model, [[(16, 30)], [(30, 16)]])


def test_fused_ops_refuse_other_layer_layouts():
    model = get_model("qwen3_vl")  # q_norm / k_norm inside its attention
    with pytest.raises(vtoken.PruningConfigError, match="Llama-layout.*Qwen3VLTextDecoderLayer"):
        StaticDecoder(model, fused_ops=True)
    granite, _ = _tiny_granite_next(1.0)  # Llama's sub-modules, another forward
    with pytest.raises(vtoken.PruningConfigError, match="GraniteDecoderLayer"):
        StaticDecoder(granite, fused_ops=True)


def test_static_decode_scales_granite_embeddings():
    """Granite multiplies the token embeddings inside its text model; the static step must too."""
    model, inputs = _tiny_granite_next(3.0)
    logits = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, i, o: logits.append((o if o.dim() == 2 else o[:, -1]).clone()))
    try:
        ref = model.generate(**inputs, **GEN)
        ref_logits, logits[:] = logits[:], []
        got, _ = static(model, inputs)
    finally:
        hook.remove()
    assert torch.equal(got, ref)
    assert len(logits) == len(ref_logits) == T  # prefill + T - 1 steps, same tokens fed: same logits
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_fused_ops_graph_decode_on_gpu(name):
    """The Triton decode ops inside the captured decode step (float32 tiny models): the same
    tokens as generate, pruned and unpruned, and the same as the unfused graph decode."""
    import tiny_models as tm

    model = (tm.tiny_llava() if name == "llava" else tm.tiny_qwen(name)).cuda()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in get_inputs(name, model).items()}
    for plan in (None, dict(method="fastv", keep=4, K=1)):
        handle = vtoken.apply_pruning(model, **plan) if plan else None
        try:
            ref = model.generate(**inputs, **GEN)
            fused = StaticDecoder(model, fused_ops=True)
            got = fused.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS)
            assert fused.last["cuda_graph"] and fused.last["fused_ops"] and fused.last["merged_projections"] > 0
            again = fused.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS)  # graph replay
            fused.close()
        finally:
            if handle is not None:
                handle.remove()
        assert torch.equal(got, ref) and torch.equal(again, ref)


def test_kept_session_serves_shorter_calls_and_both_token_choices():
    """The engine keeps one session (buffers, index lists, graphs) per shape; a later call asking for
    no more new tokens, greedy or with a ``next_token`` chooser, reuses it (on CUDA: no re-capture)
    and still returns generate's tokens; a longer call gets a new, larger session. On the CPU,
    ``graph_prefill=True`` keeps the session the same way, without graphs."""
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    dec = StaticDecoder(model, graph_prefill=True)
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
        for n, reused, choose in ((6, False, None), (3, True, None), (4, True, "argmax"), (6, True, None),
                                  (8, False, "argmax"), (2, True, None)):
            ref = model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=SUPPRESS, eos_token_id=[])
            kw = {} if choose is None else {"next_token": lambda logits: logits.argmax(-1)}
            got = dec.generate(**inputs, max_new_tokens=n, suppress_tokens=SUPPRESS, eos_token_id=[], **kw)
            assert torch.equal(got, ref), (n, choose)
            assert dec.last["session_reused"] is reused, (n, choose)
            assert dec.last["decode_steps"] == n - 1


@pytest.mark.gpu
def test_kept_session_replays_without_recapture_on_gpu():
    """Alternating ``max_new_tokens`` (no more than the first call's) and the token choice replays the
    kept graphs: one capture per token choice, none after, and generate's tokens every time."""
    import tiny_models as tm

    model = tm.tiny_qwen("qwen2_vl").cuda()
    inputs = {k: v.cuda() for k, v in get_inputs("qwen2_vl", model).items()}
    dec = StaticDecoder(model)
    argmax = {"next_token": lambda logits: logits.argmax(-1)}
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
        for n, kw, captures in ((6, {}, True), (2, {}, False), (6, argmax, True), (3, {}, False), (4, argmax, False)):
            # (this tiny Qwen has no pad token: transformers 5.17 takes the first EOS id as pad)
            ref = model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=SUPPRESS, eos_token_id=[],
                                 pad_token_id=tm.PAD_ID)
            got = dec.generate(**inputs, max_new_tokens=n, suppress_tokens=SUPPRESS, eos_token_id=[], **kw)
            assert torch.equal(got, ref) and dec.last["cuda_graph"]
            assert (dec.last["capture_ms"] > 0) is captures, (n, kw)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_fused_ops_batch1_decode_runs_its_projections_through_the_gemv_kernel(name):
    """At batch 1 with gemv=True the fused decode step computes every projection and the LM head with
    vtoken.kernels.gemv (Triton, interpreted here): the same tokens as generate, and each decode step
    calls the kernel once per merged q/k/v, o, merged gate/up and down of every layer, plus the head."""
    from conftest import slice_sample
    from vtoken.kernels import gemv as G

    model = get_model(name)
    inputs = slice_sample(get_inputs(name, model), 0, model)
    ref = model.generate(**inputs, **GEN)
    calls = []
    real = G.gemv

    def counted(x, weight, *a, **k):
        calls.append(tuple(weight.shape))
        return real(x, weight, *a, **k)

    G.gemv = counted
    try:
        got, dec = static(model, inputs, fused_ops=True, gemv=True, backend="triton")
        plain, _ = static(model, inputs, fused_ops=True, backend="triton")  # the default: cuBLAS's GEMM
    finally:
        G.gemv = real
    assert torch.equal(got, ref) and torch.equal(plain, ref)
    layers = len(model.model.language_model.layers)
    assert dec.last["decode_steps"] == T - 1 and len(calls) == (T - 1) * (4 * layers + 1)  # none by default
    assert calls[-1] == tuple(model.get_output_embeddings().weight.shape)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_batch1_gemv_inside_the_decode_graph_on_gpu(name):
    """Batch 1 on CUDA: the GEMV kernel (autotuned by the warm-up step, then captured) computes the
    decode step's projections inside the CUDA graph; the tokens equal generate's and cuBLAS's
    (gemv=False), pruned and unpruned, on the first call and on a replay."""
    import tiny_models as tm
    from conftest import slice_sample
    from vtoken.kernels import gemv as G

    calls = []
    real = G.gemv

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    model = (tm.tiny_llava() if name == "llava" else tm.tiny_qwen(name)).cuda()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in slice_sample(get_inputs(name, model), 0, model).items()}
    for plan in (None, dict(method="fastv", keep=4, K=1)):
        handle = vtoken.apply_pruning(model, **plan) if plan else None
        try:
            ref = model.generate(**inputs, **GEN)
            outs = []
            for gemv in (True, False):
                dec = StaticDecoder(model, fused_ops=True, gemv=gemv)
                calls.clear()
                G.gemv = counted
                try:
                    outs += [dec.generate(**inputs, max_new_tokens=T, suppress_tokens=SUPPRESS) for _ in range(2)]
                finally:
                    G.gemv = real
                assert dec.last["cuda_graph"] and dec.last["gemv"] is gemv and bool(calls) is gemv
                dec.close()
        finally:
            if handle is not None:
                handle.remove()
        assert all(torch.equal(o, ref) for o in outs), plan


def test_gemv_option_needs_fused_ops():
    with pytest.raises(vtoken.PruningConfigError, match="fused_ops"):
        StaticDecoder(get_model("llava"), gemv=True)


@pytest.mark.parametrize("suppress", [SUPPRESS, torch.tensor(SUPPRESS)])
def test_suppressed_tokens_add_no_host_wait(suppress):
    """A call with ``suppress_tokens`` as a list waits for the device no more often than one without
    (the kept session's signature holds the ids read on the host before the prefill: a device copy
    read back there would wait for the eager prefill before the captured tail could be launched); a
    tensor of ids is read once, and keys the kept session like the same list."""
    from conftest import count_syncs

    model = get_model("llava")
    inputs = get_inputs("llava", model)
    dec = StaticDecoder(model, graph_prefill=True)
    with vtoken.apply_pruning(model, method="fastv", keep=4, K=1):
        def call(tokens):
            return lambda: dec.generate(**inputs, max_new_tokens=1, suppress_tokens=tokens, eos_token_id=[])
        call(SUPPRESS)(), call(None)()  # (one kept session: each call below makes its own again)
        with_ids, without = count_syncs(call(suppress)), count_syncs(call(None))
        reference = model.generate(**inputs, max_new_tokens=1, do_sample=False, suppress_tokens=SUPPRESS, eos_token_id=[])
        for reused in (False, True):
            assert torch.equal(call(suppress)(), reference)
            assert dec.last["session_reused"] is reused
    assert with_ids <= without + (0 if isinstance(suppress, list) else 1), (with_ids, without)
