"""Decode-time stages (issue 24, item 2): A2SF's and LOOK-M's visual KV eviction / merging during
``generate`` on the dynamic cache.

References are written from the papers / the released code (A2SF arXiv:2407.20485: ``score_t =
lambda * score_{t-1} + attn_t``; LOOK-M SUSTechBruce/LOOK-M ``TextPivotMerge_LayerWise``: cosine
pivot merge, ``scatter_reduce(mean, include_self=True)``) as plain loops over the model's own
attention maps (``output_attentions``) and its unpruned prefill cache; invariants: keep-all =
plain generation, batch = each sample alone, decode logits = the plain model's with the evicted
keys masked out, KV bytes shrink by exactly the evicted entries."""

import pytest
import torch

import vtoken
from conftest import SUPPRESS, get_inputs, slice_sample
import tiny_models as tm
from vtoken import DecodeStage
from vtoken.errors import PruningConfigError, UnsupportedCallError
from vtoken.hooks.decode_cache import DECODE_ATTR, compact
from vtoken.hooks.decode_runtime import segment_selection
from vtoken.scorers.decode import A2SFScorer, DecodeScorer, accumulate_scores, pivot_merge

GEN = dict(do_sample=False, suppress_tokens=SUPPRESS, return_dict_in_generate=True, output_scores=True,
           output_logits=True)
VISUAL = (tm.IMAGE_ID, tm.VIDEO_ID)


# ---------------------------------------------------------------- references (loops, from the papers / code)
def ref_a2sf_scores(rows_list, lam):
    """rows_list: per query, oldest first, a (L_t,) attention row over the slots cached then (later
    rows are longer); score_t = lam * score_{t-1} + attn_t, keys new at t start at 0."""
    score = torch.zeros(0, dtype=torch.float64)
    for row in rows_list:
        grown = torch.zeros(row.shape[0], dtype=torch.float64)
        grown[:score.shape[0]] = score
        score = lam * grown + row.double()
    return score


def ref_pivot_merge(keys, values, kept, evicted):
    """LOOK-M's pivot merge, one (sample, head) at a time: target = argmax cosine over kept keys;
    kept_t <- (kept_t + sum_e (x_e + x_t) / 2) / (1 + n_t)."""
    B, H, L, D = keys.shape
    nk, nv = keys.clone().double(), values.clone().double()
    for b in range(B):
        ks = [j for j in range(L) if kept[b, j]]
        for h in range(H):
            acc = {t: ([keys[b, h, t].double()], [values[b, h, t].double()]) for t in ks}
            for e in range(L):
                if not evicted[b, e]:
                    continue
                sims = [torch.nn.functional.cosine_similarity(keys[b, h, e].double(), keys[b, h, t].double(), dim=0)
                        for t in ks]
                t = ks[int(torch.stack(sims).argmax())]
                acc[t][0].append((keys[b, h, e].double() + keys[b, h, t].double()) / 2)
                acc[t][1].append((values[b, h, e].double() + values[b, h, t].double()) / 2)
            for t, (kl, vl) in acc.items():
                nk[b, h, t] = torch.stack(kl).mean(0)
                nv[b, h, t] = torch.stack(vl).mean(0)
    return nk, nv


def visual_runs(ids_row):
    """Runs of visual placeholder ids in one row: list of position lists (one per image / video)."""
    runs, cur = [], []
    for p, t in enumerate(ids_row.tolist()):
        if t in VISUAL:
            cur.append(p)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def ref_kept_positions(ids, valid, scores, keep):
    """Per sample: the set of visual positions kept, the ``keep`` highest-scoring of each run."""
    out = []
    for b in range(ids.shape[0]):
        kept = set()
        for run in visual_runs(ids[b] * valid[b]):
            s = scores[b, run]
            kept |= {run[i] for i in torch.topk(s, min(keep, len(run))).indices.tolist()}
        out.append(kept)
    return out


def prompt_scores(attentions, valid, lam):
    """A2SF scores after the prompt from the model's own attention maps, one row at a time:
    attentions per layer (B, H, n, n); padding query rows skipped."""
    out = []
    for A in attentions:
        B, _, n, _ = A.shape
        rows = A.double().sum(1)  # (B, n, n)
        layer = torch.zeros(B, n, dtype=torch.float64)
        for b in range(B):
            layer[b] = ref_a2sf_scores([rows[b, i] * valid[b, i] for i in range(n)], lam)
        out.append(layer)
    return out


def kv_bytes(cache):
    return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
               for l in cache.layers)


def _model(name, attn="eager", seed=3):
    if name == "llava_next":
        return tm.tiny_llava_next("llava_next", attn=attn, seed=seed)
    return tm.tiny_llava(attn=attn, seed=seed) if name == "llava" else tm.tiny_qwen(name, attn=attn, seed=seed)


# ---------------------------------------------------------------- pure functions vs the references
def test_accumulate_matches_the_recursion_over_rows_and_steps():
    g = torch.Generator().manual_seed(0)
    lam = 0.3
    prompt = torch.rand(2, 7, 7, generator=g)  # (B, n, n)
    steps = [torch.rand(2, 1, 8 + t, generator=g) for t in range(3)]
    acc = accumulate_scores(None, prompt[:, :4], lam)
    acc = accumulate_scores(acc, prompt[:, 4:], lam)  # chunked prompt rows
    for s in steps:
        acc = accumulate_scores(acc, s, lam)
    for b in range(2):
        rows = [prompt[b, i] for i in range(7)] + [s[b, 0] for s in steps]
        torch.testing.assert_close(acc[b].double(), ref_a2sf_scores(rows, lam), rtol=1e-5, atol=1e-7)


def test_segment_selection_keeps_the_top_budget_of_each_image():
    seg = torch.tensor([[-1, 0, 0, 0, -1, 1, 1], [-1, -1, 2, 2, 2, 2, -1]])
    scores = torch.tensor([[9., 1., 3., 2., 9., 5., 4.], [9., 9., 1., 4., 3., 2., 9.]])
    evicted = segment_selection(A2SFScorer(), seg, scores, torch.tensor([2, 1, 2]))
    assert evicted.tolist() == [[False, True, False, False, False, False, True],
                                [False, False, True, False, False, True, False]]


def test_compact_lays_kept_slots_out_with_padding_on_the_left():
    kept = torch.tensor([[True, False, True, True], [False, True, False, False]])
    take, valid = compact(kept)
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert take[0].tolist() == [0, 2, 3] and take[1, 2] == 1


def test_pivot_merge_matches_the_released_rule():
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    kept = torch.rand(2, 9, generator=g) > 0.5
    kept[:, 0] = True
    evicted = ~kept
    evicted[1, 8] = False  # a padding slot: neither kept nor evicted, unchanged
    nk, nv = pivot_merge(keys, values, kept, evicted, chunk=4)
    rk, rv = ref_pivot_merge(keys, values, kept, evicted)
    torch.testing.assert_close(nk.double(), rk, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nv.double(), rv, rtol=1e-5, atol=1e-6)


def test_decode_stage_validation():
    with pytest.raises(PruningConfigError):
        DecodeStage("a2sf", keep=4, mode="select")
    with pytest.raises(PruningConfigError):
        DecodeStage("fastv", keep=4)  # a prefill scorer
    with pytest.raises(PruningConfigError):
        DecodeStage("a2sf", keep=4, step=-1)
    with pytest.raises(PruningConfigError):
        A2SFScorer(forgetting=0.0)
    model = tm.tiny_llava()
    with pytest.raises(PruningConfigError):
        vtoken.apply_pruning(model, plan=[DecodeStage("a2sf", 4, step=2), DecodeStage("a2sf", 2, step=1)])
    with pytest.raises(PruningConfigError):
        vtoken.apply_pruning(model, plan=[DecodeStage("a2sf", 4, layers=[9])])
    with pytest.raises(PruningConfigError):  # the prefill stages are checked as in any plan
        vtoken.apply_pruning(model, plan=[vtoken.Stage(2, "fastv", 4), vtoken.Stage(1, "fastv", 4), DecodeStage("a2sf", 4)])
    with pytest.raises(PruningConfigError, match="no merge rule"):
        vtoken.apply_pruning(model, method="a2sf", keep=4, mode="merge")  # A2SF has no merge rule
    assert vtoken.hooks.handle_of(model) is None


# ---------------------------------------------------------------- end to end against the references
@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["a2sf", "lookm"])
def test_cache_holds_the_reference_kept_set(name, method):
    """After the prefill, each layer's cache holds exactly the text entries and the reference's
    kept visual entries (A2SF: forgetting-factor scores over the model's own attention maps;
    LOOK-M: summed scores, then pivot merge of the evicted entries), bit for bit the unpruned
    prefill's keys / values (merge: the reference merge of them)."""
    model = _model(name)
    inputs = get_inputs(name, model)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    keep, lam = 5, (0.1 if method == "a2sf" else 1.0)
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions
        plain = model.generate(**inputs, max_new_tokens=1, **GEN).past_key_values
        with vtoken.apply_pruning(model, method=method, keep=keep) as handle:
            out = model.generate(**inputs, max_new_tokens=3, **GEN)
            layouts = handle.decode_layouts(out.past_key_values)
            assert handle.decode_layouts(plain) is None
    assert len({id(v) for _, v in layouts.values()}) == 1  # one validity for all layers: one mask per step
    n = ids.shape[1]
    for layer, scores in enumerate(prompt_scores(attn, valid, lam)):
        want = ref_kept_positions(ids, valid, scores, keep)
        positions = layouts[layer][0]
        cache = out.past_key_values.layers[layer]
        ref_k, ref_v = plain.layers[layer].keys, plain.layers[layer].values
        if method == "lookm":
            kept = torch.zeros(ids.shape, dtype=torch.bool)
            for b in range(ids.shape[0]):
                vis = [p for run in visual_runs(ids[b] * valid[b]) for p in run]
                kept[b] = valid[b]
                kept[b, [p for p in vis if p not in want[b]]] = False
            ref_k, ref_v = ref_pivot_merge(ref_k, ref_v, kept, valid & ~kept)
        for b in range(ids.shape[0]):
            pos = positions[b]
            got = {p for p in pos.tolist() if 0 <= p < n and int(ids[b, p]) in VISUAL}
            assert got == want[b], (layer, b)
            text = {p for p in range(n) if valid[b, p] and int(ids[b, p]) not in VISUAL}
            assert text <= set(pos.tolist())
            slots = (pos >= 0).nonzero().squeeze(1)
            torch.testing.assert_close(cache.keys[b, :, slots].double(), ref_k[b, :, pos[slots]].double(),
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cache.values[b, :, slots].double(), ref_v[b, :, pos[slots]].double(),
                                       rtol=1e-5, atol=1e-6)


def test_a2sf_scores_accumulate_over_decode_steps_before_the_stage():
    """A stage at step 2 ranks by the prompt's rows and the first two decode steps' rows, each
    older one faded by the forgetting factor (the plain model's attention: nothing is evicted
    before the stage)."""
    model = _model("llava")
    inputs = get_inputs("llava", model)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    lam, keep = 0.5, 4
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=3, output_attentions=True, **GEN)
        with vtoken.apply_pruning(model, method="a2sf", keep=keep, forgetting=lam, step=2):
            out = model.generate(**inputs, max_new_tokens=4, **GEN)
    state = getattr(out.past_key_values, DECODE_ATTR)
    n = ids.shape[1]
    for layer in range(len(plain.attentions[0])):
        A = plain.attentions[0][layer].double().sum(1)  # prompt (B, n, n)
        for b in range(ids.shape[0]):
            rows = [A[b, i] * valid[b, i] for i in range(n)]
            rows += [plain.attentions[t][layer][b, :, 0].double().sum(0) for t in (1, 2)]
            score = ref_a2sf_scores(rows, lam)[:n]
            want = ref_kept_positions(ids[b:b + 1], valid[b:b + 1], score[None], keep)[0]
            got = {p for p in state.layers[layer].positions[b].tolist() if 0 <= p < n and int(ids[b, p]) in VISUAL}
            assert got == want, (layer, b)


class FirstK(DecodeScorer):
    """Test scorer: keeps the first ``budget`` entries of each image, the same in every layer (so a
    2-D mask over the plain model expresses the eviction)."""

    name = "first_k"
    reads_attention = False

    def select(self, scores, mask, budget):
        return mask & (mask.long().cumsum(1) <= budget.view(-1, 1))


@pytest.mark.parametrize("step", [0, 2])
def test_decode_logits_equal_the_plain_model_with_evicted_keys_masked(step):
    """Masks and positions after an eviction: each decode step's logits are the plain model's
    when the evicted prompt positions are masked out of its 2-D attention mask from the stage's
    step on (positions counted from the unpruned length, as generate gives them)."""
    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model)
    steps, keep = 5, 7
    ids, orig = inputs["input_ids"], inputs["attention_mask"]
    n = ids.shape[1]
    hide = orig.clone()
    for b in range(ids.shape[0]):
        for run in visual_runs(ids[b] * orig[b]):
            hide[b, run[keep:]] = 0
    with torch.no_grad():
        with vtoken.apply_pruning(model, plan=[DecodeStage(FirstK(), keep=keep, step=step)]):
            out = model.generate(**inputs, max_new_tokens=steps, **GEN)
        for layer in getattr(out.past_key_values, DECODE_ATTR).layers.values():
            for b in range(ids.shape[0]):
                want = {p for p in range(n) if hide[b, p]} | set(range(n, n + step))
                assert set(layer.positions[b].tolist()) - {-1} == want
        first = model(**inputs, use_cache=True)
        torch.testing.assert_close(first.logits[:, -1], out.logits[0], rtol=1e-4, atol=1e-5)
        cache = first.past_key_values
        for t in range(1, steps):
            ones = torch.ones(ids.shape[0], t, dtype=orig.dtype)
            mask = torch.cat([hide if t > step else orig, ones], 1)
            cur = model(input_ids=out.sequences[:, n + t - 1:n + t], attention_mask=mask, past_key_values=cache,
                        use_cache=True)  # positions from the (unpruned) cache's length, as generate counts them
            cache = cur.past_key_values
            torch.testing.assert_close(cur.logits[:, -1], out.logits[t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "llava_next", "qwen3_vl"])
@pytest.mark.parametrize("method, options", [("a2sf", {}), ("lookm", {}), ("zipvl_kv", {"threshold": 0.9})])
def test_batch_equals_each_sample_alone(name, method, options):
    model = _model(name, attn="sdpa")
    inputs = get_inputs(name, model)
    with torch.no_grad(), vtoken.apply_pruning(model, method=method, keep=5, **options):
        assert_batch_equals_each_sample_alone(model, inputs, steps=5)


def assert_batch_equals_each_sample_alone(model, inputs, steps):
    batch = model.generate(**inputs, max_new_tokens=steps, **GEN)
    n = inputs["input_ids"].shape[1]
    for b in range(inputs["input_ids"].shape[0]):
        alone = model.generate(**slice_sample(inputs, b, model), max_new_tokens=steps, **GEN)
        m = alone.sequences.shape[1] - steps
        assert torch.equal(batch.sequences[b, n:], alone.sequences[0, m:]), b
        for t in range(steps):
            torch.testing.assert_close(batch.logits[t][b], alone.logits[t][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "llava_next", "qwen3_vl"])
def test_keep_everything_equals_plain_generation(name):
    model = _model(name, attn="sdpa")
    inputs = get_inputs(name, model)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=5, **GEN)
        for method, options in (("a2sf", {}), ("lookm", {}), ("zipvl_kv", {"threshold": 1.0})):
            with vtoken.apply_pruning(model, method=method, keep=1.0, **options):
                out = model.generate(**inputs, max_new_tokens=5, **GEN)
            assert torch.equal(out.sequences, plain.sequences), method
            for a, b in zip(out.scores, plain.scores):
                assert torch.equal(a, b), method


def test_kv_bytes_shrink_by_the_evicted_entries():
    """CPU-measured KV bytes (sum of key / value numel x element size over the layers): one sample
    loses exactly (visual - keep per image) entries per layer; a batch's layers are as long as the
    sample that keeps the most (left padding), and positions keep counting from the full length."""
    model = _model("llava", attn="sdpa")
    for variant in ("single", "batch"):
        inputs = get_inputs("llava", model, variant=variant)
        ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
        steps, keep = 4, 5
        with torch.no_grad():
            plain = model.generate(**inputs, max_new_tokens=steps, **GEN).past_key_values
            with vtoken.apply_pruning(model, method="a2sf", keep=keep):
                cache = model.generate(**inputs, max_new_tokens=steps, **GEN).past_key_values
                assert cache.get_seq_length() == plain.get_seq_length() == ids.shape[1] + steps - 1
        per_slot = kv_bytes(plain) // plain.layers[0].keys.shape[2]
        kept = [int(valid[b].sum()) + steps - 1 - sum(len(r) - min(keep, len(r)) for r in visual_runs(ids[b] * valid[b]))
                for b in range(ids.shape[0])]
        assert kv_bytes(cache) == per_slot * max(kept), variant
        assert kv_bytes(cache) < kv_bytes(plain)
        with pytest.raises(UnsupportedCallError, match="since-removed"):  # the plain model cannot continue it
            cache.get_seq_length()


def test_a_chosen_subset_of_layers_and_two_stages():
    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model, variant="single")
    plan = [DecodeStage("a2sf", keep=20, step=0, layers=[1, 2]), DecodeStage("lookm", keep=6, step=2, layers=[2, 3],
                                                                            mode="merge")]
    with torch.no_grad(), vtoken.apply_pruning(model, plan=plan):
        out = model.generate(**inputs, max_new_tokens=5, **GEN)
    lengths = [l.keys.shape[2] for l in out.past_key_values.layers]
    n = inputs["input_ids"].shape[1]
    assert lengths == [n + 4, n + 4 - 16, n + 4 - 30, n + 4 - 30]


def test_unsupported_calls_are_refused():
    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model, variant="single")
    with torch.no_grad(), vtoken.apply_pruning(model, method="a2sf", keep=4):
        with pytest.raises(UnsupportedCallError, match="use_cache"):
            model.generate(**inputs, max_new_tokens=3, use_cache=False)
        with pytest.raises(UnsupportedCallError, match="dynamic cache"):
            model.generate(**inputs, max_new_tokens=3, cache_implementation="static")
        with pytest.raises(UnsupportedCallError, match="reordered"):
            model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
        with pytest.raises(UnsupportedCallError, match="assist"):  # something is evicted: the cache cannot be cropped
            model.generate(**inputs, max_new_tokens=3, do_sample=False, prompt_lookup_num_tokens=2)
        plain = model(**inputs).logits  # a forward without a cache: nothing to decode, the model's own
    torch.testing.assert_close(plain, model(**inputs).logits)


def test_static_decoder_refuses_mixed_plans_and_vllm_refuses_decode_time_plans():
    """StaticDecoder runs plans of decode-time stages (tests/test_static_decode_stages.py), not yet a
    plan that also prunes in the prefill; vLLM's paged cache runs none."""
    from vtoken.engine import StaticDecoder
    from vtoken.vllm.config import make_config

    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model, variant="single")
    with vtoken.apply_pruning(model, plan=[vtoken.Stage(2, "fastv", 6), DecodeStage("lookm", 4, mode="merge")]):
        with pytest.raises(UnsupportedCallError, match="dynamic cache"):
            StaticDecoder(model).generate(max_new_tokens=2, **inputs)
    with vtoken.apply_pruning(model, method="lazyllm", keep=4, until=2):  # re-admission: dynamic cache only
        with pytest.raises(UnsupportedCallError, match=r"\['lazyllm'\].*dynamic cache"):
            StaticDecoder(model).generate(max_new_tokens=2, **inputs)
    with pytest.raises(PruningConfigError, match="paged cache"):
        make_config("a2sf", 4)


def test_bench_hook_reports_the_evicted_kv_bytes():
    """``vtoken.bench.decode_kv`` (the GPU measurement's hook) on the CPU: its KV column is the
    cache generate returns, shrunk by exactly the evicted entries."""
    from vtoken.bench.decode_kv import measure

    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model, variant="single")
    rows = measure(model, inputs, methods=("a2sf", "lookm"), keep=5, new_tokens=3, repeats=1)
    assert [r["method"] for r in rows] == ["none", "a2sf", "lookm"]
    evicted = sum(len(r) - 5 for r in visual_runs(inputs["input_ids"][0]))
    per_slot = rows[0]["kv_bytes"] // (inputs["input_ids"].shape[1] + 2)
    assert rows[1]["kv_bytes"] == rows[2]["kv_bytes"] == rows[0]["kv_bytes"] - evicted * per_slot
    assert vtoken.hooks.handle_of(model) is None


# ---------------------------------------------------------------- ZipVL's mixed-precision KV ("quantize" mode)
def ref_quant_dequant(vec, bits):
    """One key / value vector on its own asymmetric min-max grid of 2**bits levels (loop, in
    float32 like the cache: a value on a rounding boundary goes the same way)."""
    f32 = torch.float32
    lo, hi = vec.min().to(f32), vec.max().to(f32)
    scale = (hi - lo) / (2 ** bits - 1)
    out = []
    for x in vec.to(f32):
        code = 0 if scale == 0 else min(max(int(torch.round((x - lo) / scale)), 0), 2 ** bits - 1)
        out.append(float(lo + code * scale))
    return torch.tensor(out, dtype=torch.float64)


def ref_zipvl_count(scores, threshold, budget):
    """ZipVL's adaptive count: the smallest p whose top-p share of the image's attention reaches
    tau, capped by the budget, at least one."""
    share = sorted((s / sum(scores) for s in scores), reverse=True)
    total, p = 0.0, 0
    for s in share:
        if total >= threshold:
            break
        total, p = total + s, p + 1
    return max(1, min(p, budget))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_low_bit_round_trip_matches_the_reference_grid(bits):
    from vtoken.kernels.lowbit import dequantize_tokens, quantize_tokens

    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(bits))
    x[0, 0, 0] = 0.5  # a constant vector: scale 0
    packed, scale, lo = quantize_tokens(x, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 8 * bits // 8)
    y = dequantize_tokens(packed, scale, lo, bits)
    for idx in [(0, 0, 0), (0, 1, 2), (1, 2, 4), (1, 0, 3)]:
        torch.testing.assert_close(y[idx].double(), ref_quant_dequant(x[idx], bits), rtol=1e-5, atol=1e-6)


def test_zipvl_count_matches_the_reference():
    from vtoken.scorers.decode import ZipVLKVScorer

    g = torch.Generator().manual_seed(4)
    scores = torch.rand(6, 9, generator=g) ** 4
    mask = torch.rand(6, 9, generator=g) > 0.2
    mask[:, 0] = True
    budget = torch.tensor([9, 3, 9, 1, 5, 9])
    for tau in (0.5, 0.9, 0.975):
        keep = ZipVLKVScorer(tau).select(scores, mask, budget)
        for s in range(6):
            real = [float(scores[s, j]) for j in range(9) if mask[s, j]]
            want = ref_zipvl_count(real, tau, int(budget[s]))
            assert int(keep[s].sum()) == want and not (keep[s] & ~mask[s]).any()
            kept = scores[s][keep[s]]
            assert kept.min() >= scores[s][mask[s] & ~keep[s]].max() if (mask[s] & ~keep[s]).any() else True


class FirstKLowBits(FirstK):
    name = "first_k_low_bits"


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_mode_logits_equal_the_plain_model_on_dequantised_entries(bits):
    """Decode logits with a ``"quantize"`` stage equal the plain model's after the same entries of
    its prefill cache are replaced by the reference grid's values (every layer); KV bytes: the
    full-precision entries are gone, the packed ones and their scales / offsets are counted."""
    from vtoken.bench.common import kv_bytes as bench_kv_bytes

    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model)
    steps, keep = 4, 7
    ids, orig = inputs["input_ids"], inputs["attention_mask"]
    n = ids.shape[1]
    low = [[p for run in visual_runs(ids[b] * orig[b]) for p in run[keep:]] for b in range(ids.shape[0])]
    with torch.no_grad():
        plain_out = model.generate(**inputs, max_new_tokens=steps, **GEN)
        with vtoken.apply_pruning(model, plan=[DecodeStage(FirstKLowBits(), keep=keep, mode="quantize", bits=bits)]):
            out = model.generate(**inputs, max_new_tokens=steps, **GEN)
        # generate's prefill cache (its rotary positions follow the padding mask; a plain forward's do not, and
        # a rotated key quantises differently)
        cache = model.generate(**inputs, max_new_tokens=1, **GEN).past_key_values
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                for b in range(ids.shape[0]):
                    for p in low[b]:
                        for h in range(t.shape[1]):
                            t[b, h, p] = ref_quant_dequant(t[b, h, p], bits).to(t.dtype)
        for t in range(1, steps):
            mask = torch.cat([orig, torch.ones(ids.shape[0], t, dtype=orig.dtype)], 1)
            cur = model(input_ids=out.sequences[:, n + t - 1:n + t], attention_mask=mask, past_key_values=cache,
                        position_ids=(mask.cumsum(-1) - 1)[:, -1:], use_cache=True)
            cache = cur.past_key_values
            torch.testing.assert_close(cur.logits[:, -1], out.logits[t], rtol=1e-4, atol=1e-5)
    H, D = plain_out.past_key_values.layers[0].keys.shape[1], plain_out.past_key_values.layers[0].keys.shape[3]
    Q = max(len(x) for x in low)
    full = [int(orig[b].sum()) + steps - 1 - len(low[b]) for b in range(ids.shape[0])]
    per_layer = 2 * ids.shape[0] * H * (max(full) * D * 4 + Q * (D * bits // 8 + 2 * 4))
    assert bench_kv_bytes(out.past_key_values) == per_layer * len(model.model.language_model.layers)
    assert bench_kv_bytes(out.past_key_values) < bench_kv_bytes(plain_out.past_key_values)


def test_quantize_stage_must_be_the_last_of_its_layers():
    model = tm.tiny_llava()
    with pytest.raises(PruningConfigError, match="last stage"):
        vtoken.apply_pruning(model, plan=[DecodeStage("zipvl_kv", 8, mode="quantize"), DecodeStage("a2sf", 4, step=2)])
    with pytest.raises(PruningConfigError):
        DecodeStage("a2sf", 4, mode="quantize", bits=3)


def test_continuing_a_pruned_cache_with_more_text_equals_the_masked_plain_model():
    """A second ``generate`` on the returned cache (multi-turn: the first answer plus new text, no
    new image): its multi-token forward and the steps after it see the pruned layers through
    masks of q > 1 queries, as the plain model does with the evicted positions masked."""
    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model, variant="single")
    ids, orig = inputs["input_ids"], inputs["attention_mask"]
    n, keep = ids.shape[1], 6
    hide = orig.clone()
    for run in visual_runs(ids[0]):
        hide[0, run[keep:]] = 0
    more = torch.tensor([[11, 12, 13]])
    with torch.no_grad():
        with vtoken.apply_pruning(model, plan=[DecodeStage(FirstK(), keep=keep)]):
            out = model.generate(**inputs, max_new_tokens=4, **GEN)
            seq = torch.cat([out.sequences, more], 1)
            out2 = model.generate(input_ids=seq, attention_mask=torch.ones_like(seq), past_key_values=out.past_key_values,
                                  max_new_tokens=2, **GEN)
        cache = model(**inputs, use_cache=True).past_key_values
        chunks = [out.sequences[:, n + t:n + t + 1] for t in range(3)] + [torch.cat([out.sequences[:, n + 3:], more], 1),
                                                                          out2.sequences[:, -2:-1]]
        seen = 0
        for i, chunk in enumerate(chunks):
            seen += chunk.shape[1]
            mask = torch.cat([hide, torch.ones(1, seen, dtype=hide.dtype)], 1)
            cur = model(input_ids=chunk, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = cur.past_key_values
            want = out.logits[i + 1] if i < 3 else out2.logits[i - 3]
            torch.testing.assert_close(cur.logits[:, -1], want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- a plan with prefill and decode-time stages
MIXED_PREFILL = 12


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_mixed_plan_keep_all_decode_stage_equals_the_prefill_plan(name):
    model = _model(name, attn="sdpa")
    inputs = get_inputs(name, model)
    with torch.no_grad():
        with vtoken.apply_pruning(model, plan=[vtoken.Stage(2, "fastv", MIXED_PREFILL)]):
            ref = model.generate(**inputs, max_new_tokens=5, **GEN)
        with vtoken.apply_pruning(model, plan=[vtoken.Stage(2, "fastv", MIXED_PREFILL), DecodeStage("a2sf", 1.0)]) as h:
            out = model.generate(**inputs, max_new_tokens=5, **GEN)
            assert [type(st).__name__ for st in h.decode_plan] == ["DecodeStage"] and len(h.plan) == 1
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_mixed_plan_batch_equals_each_sample_alone(name):
    model = _model(name, attn="sdpa")
    inputs = get_inputs(name, model)
    plan = [vtoken.Stage(2, "fastv", MIXED_PREFILL), DecodeStage("lookm", 5, mode="merge")]
    with torch.no_grad(), vtoken.apply_pruning(model, plan=plan):
        assert_batch_equals_each_sample_alone(model, inputs, steps=4)


def test_mixed_plan_ranks_the_prefill_layout_by_its_own_attention():
    """After a prefill stage at layer 2, the decode stage ranks the layers 2.. by their attention
    over the pruned layout (the prefill runtime's own eager maps) and keeps the reference's set
    among the tokens the prefill kept; layers 0-1 rank the full prompt."""
    model = _model("llava")
    inputs = get_inputs("llava", model)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    keep, lam, n = 5, 0.1, inputs["input_ids"].shape[1]
    prefill = vtoken.Stage(2, "fastv", MIXED_PREFILL)
    with torch.no_grad():
        with vtoken.apply_pruning(model, plan=[prefill]) as h:
            attn = model(**inputs, output_attentions=True).attentions
            layout = h.stats.positions.clone()  # (B, N_s) original position per slot after the stage, -1 padding
        with vtoken.apply_pruning(model, plan=[prefill, DecodeStage("a2sf", keep)]) as h:
            out = model.generate(**inputs, max_new_tokens=3, **GEN)
            layouts = h.decode_layouts(out.past_key_values)
            lengths = [l.keys.shape[2] for l in out.past_key_values.layers]
    for layer, A in enumerate(attn):
        if layer < 2:
            pos_of = torch.arange(n).expand(ids.shape[0], -1).masked_fill(~valid, -1)
        else:
            pos_of = layout
        slot_valid = pos_of >= 0
        scores = prompt_scores([A], slot_valid, lam)[0]
        slot_ids = torch.where(slot_valid, ids.gather(1, pos_of.clamp(min=0)), torch.zeros_like(pos_of))
        want = ref_kept_positions(slot_ids, slot_valid.long(), scores, keep)  # kept slots
        for b in range(ids.shape[0]):
            want_pos = {int(pos_of[b, j]) for j in want[b]}
            got = {p for p in layouts[layer][0][b].tolist() if 0 <= p < n and int(ids[b, p]) in VISUAL}
            assert got == want_pos, (layer, b)
    assert len(set(lengths)) == 1  # every layer keeps the text and `keep` per image now


# ---------------------------------------------------------------- review fixes (D1-D4)
def test_a_later_stage_on_other_layers_ranks_the_prompt_and_the_steps_before_it():
    """D1: a stage whose layers no earlier stage prunes still folds the prompt's rows and the
    decode steps' rows before its step into its layers' scores, with its own scorer (not the next
    stage's): layers 2-3's kept sets are the reference's over the model's own attention maps."""
    model = _model("llava")
    inputs = get_inputs("llava", model)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    lam, keep, n = 0.5, 4, inputs["input_ids"].shape[1]
    plan = [DecodeStage(A2SFScorer(forgetting=0.1), keep=6, step=0, layers=[1]),
            DecodeStage(A2SFScorer(forgetting=0.9), keep=5, step=1, layers=[1]),
            DecodeStage(A2SFScorer(forgetting=lam), keep=keep, step=2, layers=[3, 2])]
    with torch.no_grad(), vtoken.apply_pruning(model, plan=plan):
        out = model.generate(**inputs, max_new_tokens=4, output_attentions=True, **GEN)
    state = getattr(out.past_key_values, DECODE_ATTR)
    for layer in (2, 3):
        A = out.attentions[0][layer].double().sum(1)  # prompt (B, n, n): the plain prefill's
        for b in range(ids.shape[0]):
            rows = [A[b, i] * valid[b, i] for i in range(n)]
            rows += [out.attentions[t][layer][b, :, 0].double().sum(0) for t in (1, 2)]  # full slots until step 2
            score = ref_a2sf_scores(rows, lam)[:n]
            want = ref_kept_positions(ids[b:b + 1], valid[b:b + 1], score[None], keep)[0]
            got = {p for p in state.layers[layer].positions[b].tolist() if 0 <= p < n and int(ids[b, p]) in VISUAL}
            assert got == want, (layer, b)


def test_a_layer_skipped_by_the_next_stage_keeps_accumulating_for_its_own():
    """D1: layer 1 is pruned by stages 0 and 2, not by stage 1: while stage 1 is next, its scores
    still take every decode step's row, with stage 2's forgetting factor; stage 2's kept set is the
    reference's (prompt rows at stage 0's factor, stage 0's kept slots, then the steps' rows)."""
    model = _model("llava")
    inputs = get_inputs("llava", model)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    n, lam0, lam2, keep = inputs["input_ids"].shape[1], 0.1, 0.5, 4
    plan = [DecodeStage(A2SFScorer(forgetting=lam0), keep=8, step=0, layers=[1]),
            DecodeStage(A2SFScorer(forgetting=0.9), keep=6, step=1, layers=[2]),
            DecodeStage(A2SFScorer(forgetting=lam2), keep=keep, step=2, layers=[1])]
    with torch.no_grad(), vtoken.apply_pruning(model, plan=plan):
        out = model.generate(**inputs, max_new_tokens=4, output_attentions=True, **GEN)
    state = getattr(out.past_key_values, DECODE_ATTR)
    A = out.attentions[0][1].double().sum(1)  # layer 1's prompt maps (B, n, n)
    kept0 = valid & ~state.evicted[0][1]  # (B, n) stage 0's kept positions
    P = int(kept0.sum(1).max())  # layer 1's slots after stage 0 (left padded)
    for b in range(ids.shape[0]):
        prompt = ref_a2sf_scores([A[b, i] * valid[b, i] for i in range(n)], lam0)
        pos = kept0[b].nonzero().squeeze(1).tolist()
        score = prompt[pos]
        for t in (1, 2):  # forwards before stage 2: rows over the kept slots, then the appended tokens
            row = out.attentions[t][1][b, :, 0].double().sum(0)
            row = torch.cat([row[P - len(pos):P], row[P:]])
            score = lam2 * torch.cat([score, torch.zeros(row.shape[0] - score.shape[0], dtype=torch.float64)]) + row
        want = set()
        for run in visual_runs(ids[b] * valid[b]):
            cand = [j for j, p in enumerate(pos) if p in run]
            top = torch.topk(score[cand], min(keep, len(cand))).indices.tolist()
            want |= {pos[cand[i]] for i in top}
        got = {p for p in state.layers[1].positions[b].tolist() if 0 <= p < n and int(ids[b, p]) in VISUAL}
        assert got == want, b


def test_mixed_plan_batch_with_a_row_that_keeps_everything_equals_each_sample_alone():
    """D2: the longest row has no image (the prefill stage keeps all of it, so the pruned layout is
    as long as the prompt) while the other row is re-padded on the left: the decode stage's
    scores must use the re-laid-out validity, batch = each sample alone (scores, kept sets)."""
    model = _model("llava", attn="eager")
    per = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    inputs = tm.llava_inputs(model, [per + 20, 3], [0, 1], [4, 4])

    def run(plan, **kw):
        with vtoken.apply_pruning(model, plan=plan) as h:
            cache = model.generate(**kw, max_new_tokens=2, **GEN).past_key_values
            return getattr(cache, DECODE_ATTR), h.decode_layouts(cache)

    with torch.no_grad():
        later = [vtoken.Stage(2, "fastv", MIXED_PREFILL), DecodeStage("a2sf", 5, step=10)]  # scores still held
        (batch, _), (alone, _) = run(later, **inputs), run(later, **slice_sample(inputs, 1, model))
        for layer in range(model.config.text_config.num_hidden_layers):
            rows = []
            for st, b in ((batch, 1), (alone, 0)):
                rec = st.layers.get(layer)
                valid = torch.cat([st.orig_valid if rec is None else rec.valid, st.appended[:, 0 if rec is None else
                                   rec.extra:]], 1)[b]
                rows.append(st.scores[layer][b][valid])
            torch.testing.assert_close(rows[0], rows[1], rtol=1e-4, atol=1e-5)
        now = [vtoken.Stage(2, "fastv", MIXED_PREFILL), DecodeStage("a2sf", 5)]
        (_, batch), (_, alone) = run(now, **inputs), run(now, **slice_sample(inputs, 1, model))
    shift = inputs["input_ids"].shape[1] - int(inputs["attention_mask"][1].sum())
    for layer in batch:
        got = {p - shift for p in batch[layer][0][1].tolist() if p >= 0}
        assert got == {p for p in alone[layer][0][0].tolist() if p >= 0}, layer
    with torch.no_grad(), vtoken.apply_pruning(model, plan=now):
        assert_batch_equals_each_sample_alone(model, inputs, steps=4)


@pytest.mark.parametrize("options", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=2, top_k=0),
                                     dict(do_sample=False, prompt_lookup_num_tokens=2)])
def test_a_plan_with_nothing_to_evict_leaves_the_cache_plain(options):
    """D3: keep=1.0 evicts nothing: beam search (cache rows reordered), several sequences per
    prompt (rows repeated) and assisted decoding (cache cropped) run as without vtoken."""
    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model, variant="single" if "prompt_lookup_num_tokens" in options else "batch")
    kw = dict(max_new_tokens=4, suppress_tokens=SUPPRESS, return_dict_in_generate=True, output_scores=True, **options)
    with torch.no_grad():
        torch.manual_seed(0)
        plain = model.generate(**inputs, **kw)
        for method in ("a2sf", "lookm"):
            with vtoken.apply_pruning(model, method=method, keep=1.0):
                torch.manual_seed(0)
                out = model.generate(**inputs, **kw)
            assert torch.equal(out.sequences, plain.sequences), method
            for a, b in zip(out.scores, plain.scores):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_images_after_cached_tokens_are_refused():
    """D4: a visual prefill on a cache that already holds tokens (a cached text prefix, chunked
    prefill) is refused with a clear error, not a bare RuntimeError at the first eviction."""
    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model, variant="single")
    ids, k = inputs["input_ids"], 2
    with torch.no_grad(), vtoken.apply_pruning(model, method="a2sf", keep=4):
        cache = model(input_ids=ids[:, :k], use_cache=True).past_key_values
        with pytest.raises(UnsupportedCallError, match="already holds"):
            model(input_ids=ids[:, k:], pixel_values=inputs["pixel_values"], past_key_values=cache, use_cache=True,
                  attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("keep", [1.0, 10_000])
def test_a_keep_all_plan_is_plain_on_a_static_cache_and_after_cached_text(keep):
    """keep=1.0, or a token budget at least every image's count, evicts nothing, so no path may be
    refused: a static cache and images after a cached text prefix both run as the plain model does
    (the refusals are for plans that evict)."""
    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model, variant="single")
    ids, k = inputs["input_ids"], 2
    kw = dict(max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS, cache_implementation="static")
    with torch.no_grad():
        plain = model.generate(**inputs, **kw)
        prefix = model(input_ids=ids[:, :k], use_cache=True).past_key_values
        rest = {key: v for key, v in inputs.items() if key not in ("input_ids", "attention_mask")}
        plain_logits = model(input_ids=ids[:, k:], past_key_values=prefix, **rest).logits
        with vtoken.apply_pruning(model, method="a2sf", keep=keep):
            ours = model.generate(**inputs, **kw)
            prefix = model(input_ids=ids[:, :k], use_cache=True).past_key_values
            our_logits = model(input_ids=ids[:, k:], past_key_values=prefix, **rest).logits
    assert torch.equal(plain, ours)
    assert torch.equal(plain_logits, our_logits)
