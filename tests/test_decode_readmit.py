"""Decode-time stages, the catalogue's missing parts (issue 24, item 2): LazyLLM's re-admission of
evicted visual KV entries (``DecodeStage(readmit=True)``, the ``lazyllm`` preset) and MustDrop's
output-aware decode cache policy (``mustdrop_kv``).

References: LazyLLM (arXiv:2407.14057): a token's importance is the last token's attention at the
layer averaged over heads, re-computed over kept and pruned tokens at each step (a loop over heads
here, and the model's own ``output_attentions`` row of the last prompt token for the first stage);
MustDrop (liuting20/MustDrop@909afa5, ``modelling_sparse_llama.py``, the "Sparse kv cache (decoding
stage)" block): every layer from the first to the last pruning layer keeps, in its cache, only the
visual tokens the last prefill stage kept (here: from the prefill-only ``mustdrop`` plan's stats and
cache). Invariants: keep-all = plain generation; batch = each sample alone; the live cache shrinks
and stashed entries come back bit for bit at their original slots; bad input raises
:class:`vtoken.errors.PruningConfigError`.
"""

import pytest
import torch

import vtoken
from conftest import SUPPRESS, get_inputs
import tiny_models as tm
from test_decode_stages import GEN, VISUAL, _model, assert_batch_equals_each_sample_alone, kv_bytes, visual_runs
from vtoken import DecodeStage
from vtoken.errors import PruningConfigError
from vtoken.hooks.decode_cache import DECODE_ATTR
from vtoken.scorers.decode import LazyLLMScorer, last_query_attention
from vtoken.scorers.mustdrop import MustDropKVScorer, output_aware_scores

SMALL = (1, 2, 3)  # the tiny models have 4 decoder layers
MUSTDROP = {"layers": SMALL, "merge_threshold": 0.03, "global_thr": 0.3, "individual_thr": 0.3}


# ---------------------------------------------------------------- references
def ref_last_query_attention(query, keys, valid, scaling):
    """Loop over samples and query heads: softmax of q_h . k over the valid keys of the KV head
    serving h (GQA), then the mean over the query heads."""
    B, H, D = query.shape
    groups = H // keys.shape[1]
    out = torch.zeros(B, keys.shape[2], dtype=torch.float64)
    for b in range(B):
        idx = valid[b].nonzero().squeeze(1)
        for h in range(H):
            logits = torch.stack([query[b, h].double() @ keys[b, h // groups, j].double() for j in idx.tolist()])
            out[b, idx] += torch.softmax(logits * scaling, dim=0) / H
    return out


def ref_top_visual(ids_row, valid_row, scores_row, keep):
    """The ``keep`` highest-scoring positions of each visual run (ties: the lower position)."""
    kept = set()
    for run in visual_runs(ids_row * valid_row):
        order = sorted(run, key=lambda p: (-float(scores_row[p]), p))
        kept |= set(order[:keep])
    return kept


# ---------------------------------------------------------------- pure functions
def test_last_query_attention_matches_the_loop():
    g = torch.Generator().manual_seed(0)
    query, keys = torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    valid = torch.rand(2, 11, generator=g) > 0.3
    valid[:, -1] = True
    got = last_query_attention(query, keys, valid, 0.35)
    torch.testing.assert_close(got.double(), ref_last_query_attention(query, keys, valid, 0.35), rtol=1e-5, atol=1e-7)
    assert torch.all(got[~valid] == 0)


def test_output_aware_scores_mark_the_slots_the_output_layer_holds():
    positions = torch.tensor([[-1, 3, 5, 7, 9], [2, 4, 6, 8, 10]])
    output = torch.tensor([[-1, -1, 5, 9], [2, 6, 8, 10]])
    assert output_aware_scores(positions, output).tolist() == [[0, 0, 1, 0, 1], [1, 0, 1, 1, 1]]
    keep = MustDropKVScorer().select(torch.tensor([[1., 0., 1., 1.]]), torch.tensor([[True, True, True, False]]),
                                     torch.tensor([5]))
    assert keep.tolist() == [[True, False, True, False]]  # the marked real slots only, whatever the budget


def test_readmit_and_lazyllm_refuse_bad_input():
    with pytest.raises(PruningConfigError, match="lazyllm"):
        DecodeStage("a2sf", keep=4, readmit=True)  # accumulated rows cannot score stashed entries
    with pytest.raises(PruningConfigError, match="mode='evict'"):
        DecodeStage("lazyllm", keep=4, mode="quantize", readmit=True)
    with pytest.raises(PruningConfigError, match="True or False"):
        DecodeStage("lazyllm", keep=4, readmit="yes")
    model = tm.tiny_llava()
    for bad in ({"every": 0}, {"until": 1.5}, {"keep": 0}):
        with pytest.raises(PruningConfigError):
            vtoken.apply_pruning(model, method="lazyllm", **{"keep": 4, **bad})
    with pytest.raises(PruningConfigError, match="no merge rule"):
        vtoken.apply_pruning(model, plan=[DecodeStage("lazyllm", 4, mode="merge")])
    assert vtoken.hooks.handle_of(model) is None


# ---------------------------------------------------------------- LazyLLM end to end
@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_lazyllm_first_stage_keeps_the_last_prompt_tokens_top_attention(name):
    """Stage 0 (right after the prefill): each layer keeps, per image, the ``keep`` visual entries
    the last prompt token attends to most, averaged over heads (the model's own attention maps),
    bit for bit the unpruned prefill's keys and values; the rest are stashed, off the live cache."""
    model = _model(name)
    inputs = get_inputs(name, model)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    keep, n = 4, ids.shape[1]
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions
        plain = model.generate(**inputs, max_new_tokens=1, **GEN).past_key_values
        with vtoken.apply_pruning(model, method="lazyllm", keep=keep, until=1, every=1) as handle:
            out = model.generate(**inputs, max_new_tokens=2, **GEN)
            layouts = handle.decode_layouts(out.past_key_values)
    for layer, A in enumerate(attn):
        last_row = A[:, :, -1].double().mean(1)  # (B, n) left padding: the last row is the last token's
        for b in range(ids.shape[0]):
            want = ref_top_visual(ids[b], valid[b], last_row[b], keep)
            pos = layouts[layer][0][b]
            assert {p for p in pos.tolist() if 0 <= p < n and int(ids[b, p]) in VISUAL} == want, (layer, b)
            slots = (pos >= 0).nonzero().squeeze(1)
            cache = out.past_key_values.layers[layer]
            assert torch.equal(cache.keys[b, :, slots], plain.layers[layer].keys[b, :, pos[slots]])
            assert torch.equal(cache.values[b, :, slots], plain.layers[layer].values[b, :, pos[slots]])


class Alternate(LazyLLMScorer):
    """Test scorer: ranks by position, the earliest first at even stages and the latest first at
    odd ones, so every stage evicts what the previous one kept and re-admits what it evicted. It
    records the candidates' positions it is asked to score."""

    name = "alternate"

    def __init__(self):
        self.calls = 0
        self.seen = []

    def score_from_query(self, query, keys, valid, scaling):
        self.seen.append(keys)
        return torch.zeros(keys.shape[0], keys.shape[2])

    def select(self, scores, mask, budget):
        n = mask.shape[1]
        rank = torch.arange(n, dtype=torch.float32).expand_as(scores)
        stage = self.calls // self.layers_per_stage
        self.calls += 1
        order = -rank if stage % 2 == 0 else rank
        from vtoken.scorers.base import topk_mask

        return topk_mask(order, mask, budget)


def test_evicted_entries_come_back_bit_exact_at_their_slots_and_the_live_cache_shrinks():
    """Two readmit stages on every layer: stage 0 keeps each image's first ``keep`` entries, stage 1
    (before step 2) the last ``keep`` ones, all of them stashed at stage 0. The live cache holds
    exactly text + ``keep`` per image (+ generated) after each stage, the stash the rest; after
    stage 1 the re-admitted keys / values are the plain prefill's, at their original positions in
    slot order; the decode logits equal the plain model's with a 2-D mask hiding what each stage
    evicted (positions counted from the unpruned length)."""
    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model, variant="single")
    ids, orig = inputs["input_ids"], inputs["attention_mask"]
    n, keep, steps = ids.shape[1], 5, 5
    runs = visual_runs(ids[0] * orig[0])
    scorer = Alternate()
    scorer.layers_per_stage = len(model.model.language_model.layers)
    plan = [DecodeStage(scorer, keep=keep, step=0, readmit=True), DecodeStage(scorer, keep=keep, step=2, readmit=True)]
    first = {p for r in runs for p in r[:keep]}
    last = {p for r in runs for p in r[-keep:]}
    visual = {p for r in runs for p in r}
    evicted = sum(len(r) - keep for r in runs)
    sizes = []

    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=1, **GEN).past_key_values
        with vtoken.apply_pruning(model, plan=plan) as handle:
            original = handle.decode_runtime.evict

            def spy(cache, state, index):  # live and stashed sizes right after each stage
                original(cache, state, index)
                sizes.append(([l.keys.shape[2] for l in cache.layers], {k: v.keys.shape[2] for k, v in state.stash.items()},
                              {k: (v.keys.dtype, v.keys.device) for k, v in state.stash.items()}))

            handle.decode_runtime.evict = spy
            out = model.generate(**inputs, max_new_tokens=steps, **GEN)
            layouts = handle.decode_layouts(out.past_key_values)
    L = len(out.past_key_values.layers)
    assert sizes[0][0] == [n - evicted] * L and sizes[0][1] == {l: evicted for l in range(L)}  # stashed, not live
    assert sizes[1][0] == [n + 2 - evicted] * L and sizes[1][1] == {}  # no later stage: nothing kept stashed
    # stage 1's candidates: kept and stashed entries together, the whole prompt
    assert [k.shape[2] for k in scorer.seen[L:]] == [n + 2] * L
    for layer in range(L):
        pos = layouts[layer][0][0]
        assert {p for p in pos.tolist() if p in visual} == last
        assert pos.tolist() == sorted(pos.tolist())  # re-admitted entries at their original slot order
        slots = (pos < n).nonzero().squeeze(1)
        cache = out.past_key_values.layers[layer]
        assert torch.equal(cache.keys[0, :, slots], plain.layers[layer].keys[0, :, pos[slots]])
        assert torch.equal(cache.values[0, :, slots], plain.layers[layer].values[0, :, pos[slots]])
    assert kv_bytes(out.past_key_values) == kv_bytes(plain) // n * (n + steps - 1 - evicted)
    # the logits: the plain model with the evicted positions masked, stage by stage
    hide0, hide1 = orig.clone(), orig.clone()
    hide0[0, sorted(visual - first)] = 0
    hide1[0, sorted(visual - last)] = 0
    with torch.no_grad():
        cur = model(**inputs, use_cache=True)
        torch.testing.assert_close(cur.logits[:, -1], out.logits[0], rtol=1e-4, atol=1e-5)
        cache = cur.past_key_values
        for t in range(1, steps):
            mask = torch.cat([hide0 if t <= 2 else hide1, torch.ones(1, t, dtype=orig.dtype)], 1)
            cur = model(input_ids=out.sequences[:, n + t - 1:n + t], attention_mask=mask, past_key_values=cache,
                        use_cache=True)
            cache = cur.past_key_values
            torch.testing.assert_close(cur.logits[:, -1], out.logits[t], rtol=1e-4, atol=1e-5)


def test_lazyllm_kept_set_changes_and_tokens_come_back():
    """With the paper's scorer, stages before consecutive steps re-rank with each new token's
    query: some entry evicted at one stage is kept at a later one (re-admitted), and every stage's
    live cache holds text + ``keep`` per image."""
    model = _model("llava", attn="sdpa")
    inputs = get_inputs("llava", model, variant="single")
    ids, n, keep = inputs["input_ids"], inputs["input_ids"].shape[1], 3
    runs = visual_runs(ids[0])
    with torch.no_grad(), vtoken.apply_pruning(model, method="lazyllm", keep=keep, until=6) as handle:
        out = model.generate(**inputs, max_new_tokens=7, **GEN)
        state = getattr(out.past_key_values, DECODE_ATTR)
        assert handle.decode_layouts(out.past_key_values) is not None
    back = 0
    for layer in range(len(out.past_key_values.layers)):
        kept_sets = []
        for s, record in enumerate(state.evicted):  # over the candidates of that stage, in position order
            cand = sorted(range(n + s))  # kept ∪ stashed ∪ generated: every position once
            ev = record[layer][0]
            assert ev.shape[0] == n + s
            kept_sets.append({p for p, e in zip(cand, ev.tolist()) if not e and p in {q for r in runs for q in r}})
            assert len(kept_sets[-1]) == keep * len(runs)
        back += sum(len(b - a) > 0 for a, b in zip(kept_sets, kept_sets[1:]))
    assert back > 0
    assert out.past_key_values.layers[0].keys.shape[2] == n + 6 - sum(len(r) - keep for r in runs)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "llava_next", "qwen3_vl"])
def test_lazyllm_batch_equals_each_sample_alone(name):
    model = _model(name, attn="sdpa")
    inputs = get_inputs(name, model)
    with torch.no_grad(), vtoken.apply_pruning(model, method="lazyllm", keep=5, until=4):
        assert_batch_equals_each_sample_alone(model, inputs, steps=5)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_keep_everything_equals_plain_generation(name):
    """lazyllm at keep=1.0, and mustdrop_kv with thresholds that drop and merge nothing, are the
    plain model through generate, bit for bit."""
    model = _model(name, attn="sdpa")
    inputs = get_inputs(name, model)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=5, **GEN)
        for method, options in (("lazyllm", {"keep": 1.0}),
                                ("mustdrop_kv", {"layers": SMALL, "merge_threshold": 1.0, "global_thr": 0.0,
                                                 "individual_thr": 0.0})):
            with vtoken.apply_pruning(model, method=method, **options):
                out = model.generate(**inputs, max_new_tokens=5, **GEN)
            assert torch.equal(out.sequences, plain.sequences), method
            for a, b in zip(out.scores, plain.scores):
                assert torch.equal(a, b), method


# ---------------------------------------------------------------- MustDrop's output-aware cache policy
def _prefill_positions(stats, ids, valid, b, layer, num_stage_layers):
    """Original positions a prefill-only plan leaves in ``layer``'s cache for sample b: the valid
    text, and the visual tokens alive after the last stage at or before ``layer``."""
    vis = [p for r in visual_runs(ids[b] * valid[b]) for p in r]
    alive = list(range(len(vis)))
    for st in stats.stages:
        if st.layer <= layer:
            alive = st.kept[b].tolist()
    text = [p for p in range(ids.shape[1]) if valid[b, p] and int(ids[b, p]) not in VISUAL]
    return sorted(text + [vis[i] for i in alive])


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_mustdrop_kv_cuts_the_pruning_layers_to_the_output_kept_set(name):
    """The released rule: the prefill is mustdrop's; then the caches of the layers from the first
    pruning layer to the last (vtoken: stage layer - 1, the code's ``pruning_layers``) keep only the
    visual tokens the last stage kept, bit for bit mustdrop's cached entries; the layers before
    keep everything, the layers after are mustdrop's."""
    model = _model(name)
    inputs = get_inputs(name, model)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    with torch.no_grad():
        with vtoken.apply_pruning(model, method="mustdrop", **MUSTDROP) as handle:
            base = model.generate(**inputs, max_new_tokens=1, **GEN).past_key_values
            stats = handle.stats
        with vtoken.apply_pruning(model, method="mustdrop_kv", **MUSTDROP) as handle:
            out = model.generate(**inputs, max_new_tokens=2, **GEN).past_key_values
    first, last = SMALL[0] - 1, SMALL[-1] - 1
    final_stage = max(st.layer for st in stats.stages)
    cut = 0
    for layer in range(len(out.layers)):
        for b in range(ids.shape[0]):
            before = _prefill_positions(stats, ids, valid, b, layer, len(SMALL))
            final = set(_prefill_positions(stats, ids, valid, b, final_stage, len(SMALL)))
            want = [p for p in before if p in final] if first <= layer <= last else before
            cut += len(before) - len(want)
            P = len(before)
            src = base.layers[layer]
            start = src.keys.shape[2] - P  # left padding of mustdrop's cache
            slots = [start + before.index(p) for p in want]
            got = out.layers[layer]
            g0 = got.keys.shape[2] - 1 - len(want)  # one generated token after the prompt's slots
            assert torch.equal(got.keys[b, :, g0:g0 + len(want)], src.keys[b, :, slots]), (layer, b)
            assert torch.equal(got.values[b, :, g0:g0 + len(want)], src.values[b, :, slots]), (layer, b)
    assert cut > 0  # the setting drops tokens at later stages: the policy has something to cut
    assert [l.keys.shape[2] for l in out.layers[first:last + 1]] == [out.layers[-1].keys.shape[2]] * (last - first + 1)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_mustdrop_kv_batch_equals_each_sample_alone(name):
    model = _model(name, attn="sdpa")
    inputs = get_inputs(name, model)
    with torch.no_grad(), vtoken.apply_pruning(model, method="mustdrop_kv", **MUSTDROP):
        assert_batch_equals_each_sample_alone(model, inputs, steps=4)


def test_mustdrop_kv_plan_places_the_decode_stage_on_the_codes_layers():
    from vtoken.scorers.mustdrop import mustdrop_kv_plan

    plan = mustdrop_kv_plan()
    assert isinstance(plan[-1], DecodeStage) and plan[-1].layers == tuple(range(2, 15))  # the code's 2..14
    assert isinstance(plan[-1].scorer, MustDropKVScorer) and plan[-1].step == 0
    assert [st.layer for st in plan[:-1]] == [0, 3, 7, 11, 15]
