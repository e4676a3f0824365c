"""The first pruning stage adds no host<->device syncs inside the language model's forward.

On a GPU every ``.item()``, ``nonzero`` or ``torch.equal`` in the middle of an eager prefill waits
for the queued work, which costs real time when the forward is launch-bound (a 7B model at batch
1: benchmarks/profile/). The sync-causing ATen ops are counted here on the CPU with a dispatch
mode (they are the same ops on CUDA) while the language model runs, and compared with the
unpruned model's own count. The host-prepared candidates must also equal the generic (device)
computation, and a scorer that breaks its budget must still fail loudly.
"""

import collections

import pytest
import torch

import vtoken
from conftest import SyncCounter, get_inputs, get_model
from vtoken.bench.host_waits import call_site
from vtoken.hooks.prefill_plan import prepare_prefill


def _syncs_in_language_model(model, inputs) -> collections.Counter:
    """The waits inside the language model's forward, by (op, innermost vtoken / transformers frames)."""
    counter = SyncCounter(where=call_site)
    counter.on = False
    lm = model.model.language_model
    h1 = lm.register_forward_pre_hook(lambda *a: setattr(counter, "on", True))
    h2 = lm.register_forward_hook(lambda *a: setattr(counter, "on", False))
    try:
        with torch.no_grad(), counter:
            model(**inputs, use_cache=True)
    finally:
        h1.remove()
        h2.remove()
    return counter.sites


def _made_by_vtoken(sites: collections.Counter) -> dict:
    """The waits whose innermost frame is vtoken's own code."""
    return {k: n for k, n in sites.items() if k[1].startswith(("hooks/", "scorers/", "kernels/", "vtoken/"))}


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["fastv", "fastervlm"])
@pytest.mark.parametrize("variant", ["single", "batch"])
def test_first_stage_adds_no_syncs(arch, method, variant):
    if method == "fastervlm" and (arch == "qwen2_5_vl" or (arch == "qwen2_vl" and variant == "batch")):
        pytest.skip("vision-encoder attention is mapped for images only (the batch has a video), "
                    "and not for Qwen2.5-VL's windowed encoder")
    model = get_model(arch)
    inputs = get_inputs(arch, model, variant=variant)
    base = _syncs_in_language_model(model, inputs)
    with vtoken.apply_pruning(model, method=method, keep=0.25):
        pruned = _syncs_in_language_model(model, inputs)
    assert not _made_by_vtoken(pruned), f"{method} on {arch} ({variant}): vtoken waits in the LM forward"
    # transformers' own: fewer where the pruned call answers its all-ones mask test on the host (host_checks.py)
    assert sum(pruned.values()) <= sum(base.values()), f"{method} on {arch} ({variant}): {pruned}, unpruned {base}"


def test_generic_path_still_syncs():
    """The counter itself can fail: a second stage (after a re-layout) takes the generic path."""
    model = get_model("llava")
    inputs = get_inputs("llava", model, variant="single")
    base = _syncs_in_language_model(model, inputs)
    with vtoken.apply_pruning(model, method="pyramiddrop", keep=8, layers=(1, 2, 3)):
        pruned = _syncs_in_language_model(model, inputs)
    assert sum(pruned.values()) > sum(base.values()) and _made_by_vtoken(pruned)


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_host_prepared_candidates_match_hand_count(arch, pad_side):
    """prepare_prefill's first-stage candidates, budgets and kept counts, against a per-segment
    count over the layout done here with Python loops."""
    from vtoken.plan import tokens_for

    model = get_model(arch)
    inputs = get_inputs(arch, model, pad_side=pad_side)
    with vtoken.apply_pruning(model, method="fastv", keep=0.5) as handle:
        with torch.no_grad():
            model(**inputs)
        layout = handle.runtime.last_meta[0]  # the layout the prefill used (LLaVA-NeXT: newlines refined)
    valid = inputs["attention_mask"].bool()
    prep = prepare_prefill(layout, valid, 0.5, "cpu")
    B, N = valid.shape
    seg_of, prunable = layout.segment_of.tolist(), layout.prunable.tolist()
    kept = [int(valid[b].sum()) for b in range(B)]
    for s in range(layout.num_segments):
        b = int(layout.seg_sample[s])
        slots = [j for j in range(N) if seg_of[b][j] == s and prunable[b][j] and bool(valid[b, j])]
        row = prep.first.slot_pad[s].tolist()
        assert row[: len(slots)] == slots and all(v == -1 for v in row[len(slots):])
        assert prep.first.index[s, : len(slots)].tolist() == list(range(len(slots)))
        budget = min(tokens_for(0.5, int(layout.seg_count[s])), len(slots))
        assert int(prep.first.budget[s]) == budget
        kept[b] -= len(slots) - budget
    assert prep.kept_host == kept
    assert prep.drop_any == any(int(prep.first.budget[s]) < int(prep.first.counts[s]) for s in range(layout.num_segments))


class _GreedyScorer:
    """Keeps one token too many in every segment (a broken scorer)."""

    name = "greedy"
    needs = frozenset()

    def select(self, sig):
        from vtoken.scorers.base import Selection

        rank = sig.mask.long().cumsum(1)
        return Selection(keep=sig.mask & (rank <= (sig.budget + 1).unsqueeze(1)), scores=None)


class _ShortTopK:
    """Keeps one token fewer than its budget through the public topk_selection (a broken scorer
    that uses the shared primitive with its own budget)."""

    name = "short-topk"
    needs = frozenset()

    def select(self, sig):
        from vtoken.scorers.base import topk_selection

        return topk_selection(sig.index.float(), sig.mask, (sig.budget - 1).clamp(min=0))


@pytest.mark.parametrize("scorer", [_GreedyScorer, _ShortTopK])
def test_broken_budget_still_fails_loudly(scorer):
    """One token too many (own keep) or too few (topk_selection with another budget than the
    stage's): the runtime's budget check raises either way."""
    from vtoken.plan import Stage

    model = get_model("llava")
    inputs = get_inputs("llava", model, variant="single")
    with vtoken.apply_pruning(model, plan=[Stage(layer=2, scorer=scorer(), keep=8)]):
        with pytest.raises(RuntimeError, match="kept .* tokens, budget was"):
            with torch.no_grad():
                model(**inputs)


def _random_layout(gen, B, N):
    """A random layout: per row, a few runs of visual tokens (image = 0 / video = 1), some runs
    split into several segments by expected sizes, ~10 % structural tokens; and a random padding
    mask (left or right per row)."""
    from vtoken.adapters.base import layout_from_runs

    is_visual = torch.zeros(B, N, dtype=torch.bool)
    kinds = torch.zeros(B, N, dtype=torch.long)
    sizes = {0: [], 1: []}
    marks = torch.rand(B, N, generator=gen) < 0.1
    structural = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        j = int(torch.randint(0, 4, (1,), generator=gen))
        while j < N - 3:
            length = int(torch.randint(2, 12, (1,), generator=gen))
            code = int(torch.randint(0, 2, (1,), generator=gen))
            end = min(N, j + length)
            is_visual[b, j:end] = True
            kinds[b, j:end] = code
            structural[b, j + 1:end] = marks[b, j + 1:end]  # a run starts with a prunable token
            run = end - j - int(structural[b, j:end].sum())  # sizes count prunable tokens only
            cut = int(torch.randint(1, run, (1,), generator=gen)) if run > 3 else run
            sizes[code].extend([cut, run - cut] if cut < run else [run])
            j = end + int(torch.randint(1, 6, (1,), generator=gen))
    grids = {code: [None] * len(v) for code, v in sizes.items()}
    layout = layout_from_runs(is_visual, kinds, sizes, grids, structural=structural)
    valid = torch.ones(B, N, dtype=torch.bool)
    for b in range(B):
        pad = int(torch.randint(0, 4, (1,), generator=gen))
        if pad:
            if b % 2:
                valid[b, :pad] = False
            else:
                valid[b, N - pad:] = False
    return layout, valid


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("keep", [3, 0.4])
def test_host_plan_equals_generic_torch_path(seed, keep):
    """prepare_prefill (NumPy on the host) against the generic PyTorch functions the later stages
    use (candidates, text_rows) and against Python loops for the per-token indices."""
    from vtoken.adapters.base import token_runs
    from vtoken.hooks.prefill_plan import candidates, kept_slots, text_rows

    gen = torch.Generator().manual_seed(seed)
    B, N = 3, 40
    layout, valid = _random_layout(gen, B, N)
    prep = prepare_prefill(layout, valid, keep, "cpu")
    seg, prunable, vis = layout.segment_of.tolist(), layout.prunable.tolist(), layout.visual.tolist()
    # index within segment and visual ordinal, by loops
    index_ref, ord_ref = [[-1] * N for _ in range(B)], [[-1] * N for _ in range(B)]
    runs = sum(len(token_runs(layout.visual[b])) for b in range(B))
    assert layout.num_segments > runs  # some runs hold several segments
    seen = collections.Counter()
    for b in range(B):
        k = 0
        for j in range(N):
            if prunable[b][j]:
                index_ref[b][j] = seen[seg[b][j]]
                seen[seg[b][j]] += 1
            if vis[b][j]:
                ord_ref[b][j] = k
                k += 1
    assert prep.index_in_seg.tolist() == index_ref
    assert prep.vis_ordinal.tolist() == ord_ref
    pos = torch.arange(N).expand(B, N)
    ref = candidates(layout, pos, valid, torch.tensor(index_ref), keep)
    for f in ("slot_pad", "smask", "index", "budget", "counts", "cand"):
        assert torch.equal(getattr(prep.first, f), getattr(ref, f)), f
    rows, mask = text_rows(layout, pos, valid)
    assert torch.equal(prep.text[0], rows) and torch.equal(prep.text[1], mask)
    for f in ("segment_of", "structural", "seg_sample", "seg_ordinal", "seg_count"):
        assert torch.equal(getattr(prep.layout, f), getattr(layout, f)), f
    # kept_slots with a random choice of `budget` candidates per segment: valid non-candidates
    # plus the chosen ones; kept counts per row match the host's
    choice = torch.zeros_like(ref.smask)
    for s in range(layout.num_segments):
        real = ref.smask[s].nonzero().flatten()
        pick = real[torch.randperm(real.numel(), generator=gen)[: int(ref.budget[s])]]
        choice[s, pick] = True
    got = kept_slots(prep.keep_base, prep.cand_flat, choice, (B, N))
    want = valid & ~ref.cand
    for s in range(layout.num_segments):
        b = int(layout.seg_sample[s])
        want[b, ref.slot_pad[s][choice[s]]] = True
    assert torch.equal(got, want)
    assert got.sum(1).tolist() == prep.kept_host
    assert (prep.rank_shift.flatten() + torch.tensor(prep.kept_host)).tolist() == [max(prep.kept_host) - 1] * B
    from vtoken.hooks.stage_signals import last_valid as _last_valid

    assert torch.equal(prep.last_valid.flatten(), _last_valid(valid))


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_first_stage_fast_path_equals_generic_path(arch, pad_side, monkeypatch):
    """The first stage's host-planned re-layout gives the same kept positions and the same logits
    as the generic device path (forced here by hiding the host plan from the stage)."""
    _fast_equals_generic(arch, pad_side, monkeypatch, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_first_stage_fast_path_equals_generic_path_on_gpu(arch, monkeypatch):
    """The same on CUDA, where the host plan travels in one pinned, byte-packed transfer."""
    _fast_equals_generic(arch, "left", monkeypatch, "cuda")


def _fast_equals_generic(arch, pad_side, monkeypatch, device):
    import copy

    from vtoken.hooks import runtime as R

    model = get_model(arch)
    inputs = get_inputs(arch, model, pad_side=pad_side)
    if device != "cpu":
        model = copy.deepcopy(model).to(device)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def run():
        with vtoken.apply_pruning(model, method="fastv", keep=0.3) as handle, torch.no_grad():
            out = model(**inputs).logits
            return out, [t.positions for t in handle.runtime.last_trace]

    fast, fast_pos = run()
    monkeypatch.setattr(R.Runtime, "host_first_stage", False)
    slow, slow_pos = run()
    assert all(torch.equal(a, b) for a, b in zip(fast_pos, slow_pos)) and len(fast_pos) == len(slow_pos)
    tol = 0 if device == "cpu" else 1e-3  # GPU kernels may reduce in another order run to run
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)


@pytest.mark.parametrize("seed", range(5))
def test_topk_selection_meets_budget_by_construction(seed):
    """The runtime skips the budget check for a topk_selection of the stage's own mask and budget
    (exact_for): its keep must hold
    exactly min(budget, real slots) per row, never a padding slot, whatever the scores (ties,
    -inf, NaN included)."""
    from vtoken.scorers.base import topk_selection

    gen = torch.Generator().manual_seed(seed)
    S, n = 7, 23
    mask = torch.rand(S, n, generator=gen) < 0.7
    scores = torch.randint(0, 4, (S, n), generator=gen).float()  # many ties
    scores[torch.rand(S, n, generator=gen) < 0.1] = float("-inf")
    scores[torch.rand(S, n, generator=gen) < 0.05] = float("nan")
    budget = torch.randint(0, n + 3, (S,), generator=gen)
    sel = topk_selection(scores, mask, budget)
    assert sel.exact_for[0] is mask and sel.exact_for[1] is budget
    assert not (sel.keep & ~mask).any()
    assert sel.keep.sum(1).tolist() == torch.minimum(budget, mask.sum(1)).tolist()


def test_upload_round_trip_and_edge_cases():
    """upload returns every array's values, dtype (int64 / bool) and shape, including empty
    arrays among full ones and all-empty input; float arrays are refused."""
    import numpy as np

    from vtoken.hooks.prefill_plan import upload

    arrays = {"a": np.arange(6).reshape(2, 3), "m": np.array([[True, False, True]]), "e": np.zeros((0, 4), dtype=np.int64),
              "i32": np.array([7, -1], dtype=np.int32), "b": np.zeros(5, dtype=bool)}
    out = upload(arrays, "cpu")
    for k, a in arrays.items():
        t = out[k]
        assert t.dtype == (torch.bool if a.dtype == bool else torch.int64) and tuple(t.shape) == a.shape
        assert t.tolist() == a.tolist()
    empty = upload({"x": np.zeros((0, 3), dtype=np.int64), "y": np.zeros(0, dtype=bool)}, "cpu")
    assert tuple(empty["x"].shape) == (0, 3) and empty["y"].dtype == torch.bool
    with pytest.raises(TypeError, match="integer or bool"):
        upload({"f": np.ones(3)}, "cpu")


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_a_stage_that_drops_nothing_costs_its_successor_one_sync(arch):
    """Stages on a layout that a previous stage left as it was (it dropped nothing: DyVTE's gates
    that say "continue", a budget at or above what is left) reuse that layout's candidates and
    text rows: such a stage adds ONE sync (whether it drops anything), not the generic path's
    recount (nonzero, counts, budgets)."""
    model = get_model(arch)
    inputs = get_inputs(arch, model, variant="batch" if arch == "llava" else "single")
    counts = {}
    for n in (2, 3):
        plan = [vtoken.Stage(layer, "fastv", 4) for layer in range(1, 1 + n)]  # stage 2 on keeps all 4
        with vtoken.apply_pruning(model, plan=plan):
            counts[n] = sum(_syncs_in_language_model(model, inputs).values())
    assert counts[3] - counts[2] == 1, counts


def _repeat_batch(inputs: dict, times: int) -> dict:
    """``times`` copies of a one-sample batch (per-image tensors repeated with it)."""
    return {k: torch.cat([v] * times) if torch.is_tensor(v) and v.dim() else v for k, v in inputs.items()}


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method,options", [("fastv", {}), ("pyramiddrop", {"layers": (1, 2, 3)})])
def test_stats_cost_no_syncs_per_sample(arch, method, options):
    """``handle.stats`` of a batch reads each device tensor once: its syncs and host copies do not
    grow with the batch (``vtoken eval`` reads the stats of every batch of 128; on a shared GPU a
    sync per sample cost seconds per batch). Four copies of one prompt also get that prompt's stats."""
    from conftest import count_syncs

    model = get_model(arch)
    one = get_inputs(arch, model, variant="single")
    costs, stats = [], []
    for times in (1, 4):
        with vtoken.apply_pruning(model, method=method, keep=0.25, **options) as handle:
            with torch.no_grad():
                model(**_repeat_batch(one, times))
            costs.append(count_syncs(lambda: handle.stats))
            stats.append(handle.stats)
    assert costs[1] == costs[0], f"stats of 4 samples: {costs[1]} syncs / copies, of 1 sample: {costs[0]}"
    single, batch = stats
    assert len(batch.visual_tokens) == 4
    for b in range(4):
        assert batch.visual_tokens[b] == single.visual_tokens[0]
        assert batch.context_tokens[b] == single.context_tokens[0]
        assert batch.equivalent_tokens[b] == pytest.approx(single.equivalent_tokens[0])
        assert batch.segments[b] == single.segments[0]
        for st1, stb in zip(single.stages, batch.stages):
            assert torch.equal(stb.kept[b], st1.kept[0]) and stb.counts[b] == st1.counts[0]
            torch.testing.assert_close(stb.scores[b], st1.scores[0], equal_nan=True)
    assert any(bool(torch.isfinite(st.scores[0]).any()) for st in single.stages)  # scores were read


def test_deferred_checks_run_when_the_block_ends():
    """``handle.deferred_checks()``: a broken scorer's forward returns inside the block and the
    check raises at its end (the same error); a block left by an error runs none of its checks and
    the next forward outside it checks at its own end again."""
    from vtoken.plan import Stage

    model = get_model("llava")
    inputs = get_inputs("llava", model, variant="single")
    with vtoken.apply_pruning(model, plan=[Stage(layer=2, scorer=_GreedyScorer(), keep=8)]) as handle, torch.no_grad():
        with pytest.raises(RuntimeError, match="kept .* tokens, budget was"):
            with handle.deferred_checks():
                model(**inputs)  # does not raise here
                reached = True
        assert reached
        with pytest.raises(KeyError, match="own error"):
            with handle.deferred_checks():
                model(**inputs)
                raise KeyError("own error")
        with pytest.raises(RuntimeError, match="kept .* tokens, budget was"):
            model(**inputs)
    with vtoken.apply_pruning(model, method="divprune", keep=4) as handle, torch.no_grad(), handle.deferred_checks():
        model(**inputs)  # a scorer that keeps its budget passes


def test_engine_checks_budgets_after_launching_the_captured_tail(monkeypatch):
    """The static engine's pruned prefill checks the scorers' budgets (a wait for the device) only
    after the captured prefill tail is launched, not between the eager part and the tail."""
    import vtoken.hooks.handle as handle_module
    import vtoken.hooks.runtime as runtime_module
    from vtoken.engine import StaticDecoder
    from vtoken.engine.prefill import _Prefill

    events = []
    original = runtime_module.check_budget
    for module in (handle_module, runtime_module):  # where the runtime and the handle call it
        monkeypatch.setattr(module, "check_budget", lambda *a: (events.append("check"), original(*a))[1],
                            raising=False)
    make_tail = _Prefill._make_tail

    def recorded_tail(self, session, stop):
        run = make_tail(self, session, stop)
        return lambda: (events.append("tail"), run())[1]

    monkeypatch.setattr(_Prefill, "_make_tail", recorded_tail)
    model = get_model("llava")
    inputs = get_inputs("llava", model, variant="single")
    with vtoken.apply_pruning(model, method="divprune", keep=4):
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=[])
        events.clear()
        got = StaticDecoder(model, graph_prefill=True).generate(**inputs, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(got, ref)
    assert events == ["tail", "check"], events
