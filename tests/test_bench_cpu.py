"""``vtoken bench --tiny``: every suite's code path on the CPU (tiny configs of the same classes),
the structure of the result rows and their invariants; the max-batch search, the oracle feed and
the LLMC-style re-run on their own."""

import json
import os

import pytest
import torch

from vtoken.bench import cli
from vtoken.bench.common import Bench, OracleFeed
from vtoken.bench.maxbatch import is_oom, search_max_batch

SUITES = ["users", "qwen-long", "video", "qwen-lm", "llava-next", "llava", "peers", "maxbatch"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--suite", "all", "--tiny", "--device", "cpu", "--out", str(out), "--repeats", "1", "--batch", "1,2",
            "--next-batch", "1,2", "--qwen-visual", "4096,8192", "--new-tokens", "3", "--maxbatch-new-tokens", "3",
            "--users-batch", "1", "--users-new-tokens", "3", "--users-methods", "unpruned,fastv",
            "--video-batch", "1", "--video-frames", "4", "--video-methods", "uniform"]
    rc = cli.main(argv)
    with open(out / "results.json") as f:
        data = json.load(f)
    md = (out / "results.md").read_text()
    return rc, data, md, out


def rows(data, **kw):
    return [r for r in data["results"] if all(r.get(k) == v for k, v in kw.items())]


def test_run_completes_and_writes_outputs(run):
    rc, data, md, out = run
    assert rc == 0, data["meta"]["errors"]
    assert sorted(os.listdir(out)) == ["results.json", "results.md"]
    meta = data["meta"]
    assert meta["suites"] == SUITES and meta["tiny"] is True and not meta["errors"]
    for key in ("device", "torch", "transformers", "triton", "command", "repeats"):
        assert meta.get(key), key
    for r in data["results"]:
        for key in ("suite", "model", "method", "device", "torch", "transformers", "triton"):
            assert key in r, (key, r)
    for s in SUITES:
        assert rows(data, suite=s), s
        assert f"## {s}:" in md
    assert "## Summary" in md


def _groups(data, suite, key=("model", "batch")):
    out = {}
    for r in rows(data, suite=suite):
        out.setdefault(tuple(r.get(k) for k in key), []).append(r)
    return out


@pytest.mark.parametrize("suite,key", [("llava", ("model", "batch")), ("llava-next", ("model", "batch")),
                                       ("qwen-long", ("vision_path", "visual_tokens")), ("peers", ("model",))])
def test_pruned_and_oracle_invariants(run, suite, key):
    _, data, _, _ = run
    groups = _groups(data, suite, key)
    assert groups
    for g, rs in groups.items():
        (base,) = [r for r in rs if r["method"] == "unpruned"]
        pruned = [r for r in rs if r["method"].startswith("fastv")]
        oracles = [r for r in rs if r["method"] == "oracle"]
        assert pruned and len(oracles) == len(pruned), g
        for r in rs:
            assert r["ttft_ms"] > 0 and r["runs"] >= 1
            assert r.get("batch", 1) >= 1
            assert r["context"] == base["context"]
        for p in pruned:
            assert p["kept_visual"] < base["visual_tokens"]
            assert p["context_after"] == base["context"] - (p["visual_tokens"] - p["kept_visual"]) or suite == "llava-next"
            assert p["context_after"] < base["context"]
            assert p["kv_cache_bytes"] < base["kv_cache_bytes"], (g, p, base)
            assert p["ratio_to_oracle"] > 0 and p["speedup_vs_unpruned"] > 0
        for p, o in zip(pruned, oracles):
            assert o["keep"] == p["keep"]
            assert o["context_after"] == p["context_after"]  # the oracle is fed exactly the kept tokens
            assert o["kept_visual"] == p["kept_visual"]
            assert o["kv_cache_bytes"] < p["kv_cache_bytes"]  # every oracle layer holds only the kept tokens


def test_budgets_are_exact(run):
    _, data, _, _ = run
    # tiny LLaVA: 36 tokens per image; 192/128/64 of 576 -> 12/8/4
    for r in rows(data, suite="llava", method="fastv[auto]"):
        assert r["kept_visual"] == {192: 12, 128: 8, 64: 4}[r["keep"]]
    # tiny LLaVA-NeXT: 180 prunable tokens (+ 12 newlines) per image; fractions k/576
    for r in rows(data, suite="llava-next", method="fastv[auto]"):
        k = int(r["keep"].split("/")[0])
        assert r["visual_tokens"] == 192 and r["kept_visual"] == round(180 * k / 576)
        assert r["context_after"] == r["context"] - 180 + r["kept_visual"]  # newlines stay
        assert r["decode_ms_per_token"] > 0 and r["tokens_per_s"] > 0
    for r in rows(data, suite="qwen-long", method="fastv[auto]"):
        assert r["kept_visual"] == r["images"] * round(0.111 * 64)


def test_qwen_long_vision_share(run):
    _, data, _, _ = run
    rs = rows(data, suite="qwen-long")
    assert {r["vision_path"] for r in rs} == {"varlen", "sdpa"}
    assert {r["images"] for r in rs} == {1, 2}
    for r in rs:
        assert 0 < r["vision_ms"] < r["ttft_ms"]
        assert 0 < r["vision_share"] < 1
        assert abs(r["lm_ms"] + r["vision_ms"] - r["ttft_ms"]) < 0.05


def test_peers_rows(run):
    _, data, _, _ = run
    rs = {r["method"]: r for r in rows(data, suite="peers")}
    assert set(rs) == {"unpruned", "fastv[auto]", "oracle", "peer:fastv-eager-mask", "peer:fastv-eager-drop",
                       "peer:llmc-rerun"}
    assert rs["unpruned"]["visual_tokens"] == 7 * 36
    ours = rs["fastv[auto]"]
    for peer in ("fastv-eager-mask", "fastv-eager-drop", "llmc-rerun"):
        assert ours[f"speedup_vs_{peer}"] > 0
    assert rs["peer:fastv-eager-mask"]["attn"] == "eager" and rs["peer:fastv-eager-mask"]["context_after"] == ours["context"]
    for name in ("peer:fastv-eager-drop", "peer:llmc-rerun"):
        assert rs[name]["context_after"] == ours["context_after"] and rs[name]["kept_visual"] == ours["kept_visual"]
    # one eager re-run of the scoring layer per timed prefill, over all keys
    assert rs["peer:llmc-rerun"]["reruns"] >= 2 and rs["peer:llmc-rerun"]["rerun_keys"] == ours["context"]


def test_maxbatch_rows(run):
    _, data, _, _ = run
    rs = {r["method"]: r for r in rows(data, suite="maxbatch")}
    assert set(rs) == {"unpruned", "fastv[auto]"}
    for r in rs.values():
        assert r["max_batch"] >= 1 and r["first_oom_batch"] > r["max_batch"]
        assert r["probes"] and any(p["fits"] for p in r["probes"]) and any(not p["fits"] for p in r["probes"])
        assert r["new_tokens"] == 3 and r["simulated_cap"] is True
    assert rs["fastv[auto]"]["max_batch"] >= rs["unpruned"]["max_batch"]
    assert rs["fastv[auto]"]["max_batch_vs_unpruned"] >= 1.0


def test_summary_from_json(run, capsys):
    _, _, _, out = run
    assert cli.main(["--summary-from", str(out / "results.json")]) == 0
    text = capsys.readouterr().out
    assert "largest batch" in text and "fastv-eager-mask" in text and "qwen-long" in text


# ---------------------------------------------------------------- pieces
@pytest.mark.parametrize("limit", [1, 7, 13, 100, 517, 5000])
def test_search_max_batch_finds_the_limit(limit):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= limit, {"reserved": 10 + 3 * b}

    predict = lambda probes: int((10 + 3 * limit - 10) / 3 * 0.97)  # noqa: E731 - a close linear guess
    lo, hi, probes = search_max_batch(fits, start=8, predict=predict, tol=0.05, max_probes=12, hard_max=4096)
    if limit >= 4096:
        assert lo == 4096 and hi is None
    else:
        assert lo <= limit < hi and hi - lo <= max(1, int(0.05 * lo))
    assert len(probes) == len(calls) <= 12


def test_search_max_batch_respects_probe_budget_and_time():
    lo, hi, probes = search_max_batch(lambda b: (b <= 300, {}), start=8, max_probes=4)
    assert len(probes) == 4 and lo == 64 and hi is None
    lo, hi, probes = search_max_batch(lambda b: (b <= 300, {}), start=8, max_probes=10, time_ok=lambda: False)
    assert len(probes) == 1 and lo == 8


def test_is_oom():
    assert is_oom(torch.cuda.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_oom(RuntimeError("shape mismatch"))


def _tiny_llava():
    from vtoken.bench import models as M

    torch.manual_seed(0)
    model = M.build_llava(True, "cpu", torch.float32)
    return model, M.llava_inputs(model, 2, n_images=2)


def test_oracle_feed_is_the_model_on_the_kept_tokens():
    model, inputs = _tiny_llava()
    lm = model.model.language_model
    N = inputs["input_ids"].shape[1]
    seen = {}
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        full = model(**inputs, logits_to_keep=1).logits
    h.remove()
    with torch.no_grad(), OracleFeed(lm, torch.arange(N).expand(2, N), N):
        same = model(**inputs, logits_to_keep=1).logits
    torch.testing.assert_close(same, full)
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.sort(torch.randperm(N - 1, generator=g)[:40]).values for _ in range(2)])
    idx = torch.cat([idx, torch.full((2, 1), N - 1)], dim=1)
    with torch.no_grad(), OracleFeed(lm, idx, N) as feed:
        got = model(**inputs, logits_to_keep=1).logits
    assert feed.fed == [41]
    e = seen["embeds"].gather(1, idx.unsqueeze(-1).expand(2, 41, seen["embeds"].shape[-1]))
    with torch.no_grad():
        h = lm(inputs_embeds=e, position_ids=idx).last_hidden_state
        want = model.lm_head(h[:, -1:])
    torch.testing.assert_close(got, want)


def test_oracle_feed_ragged_counts_mask_the_padding_slots():
    """Adaptive methods keep different counts per sample: the handle pads with -1. The oracle feeds
    the same padded layout with those slots masked, so each sample's kept tokens give what the
    language model gives on that sample's kept tokens alone."""
    model, inputs = _tiny_llava()
    lm = model.model.language_model
    N = inputs["input_ids"].shape[1]
    seen, outs = {}, {}
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)
    h.remove()
    g = torch.Generator().manual_seed(2)
    keep = [41, 30]
    rows = [torch.sort(torch.randperm(N, generator=g)[:k]).values for k in keep]
    idx = torch.stack([torch.cat([r, torch.full((max(keep) - len(r),), -1)]) for r in rows])
    h = lm.register_forward_hook(lambda m, a, o: outs.update(h=o.last_hidden_state))
    with torch.no_grad(), OracleFeed(lm, idx, N) as feed:
        model(**inputs, logits_to_keep=1)
    h.remove()
    assert feed.fed == [max(keep)]
    for b, r in enumerate(rows):
        e = seen["embeds"][b:b + 1, r]
        with torch.no_grad():
            want = lm(inputs_embeds=e, position_ids=r[None]).last_hidden_state[0]
        torch.testing.assert_close(outs["h"][b, :len(r)], want, rtol=1e-4, atol=1e-4)


def test_llmc_rerun_scores_are_attention_rows():
    from vtoken.bench.peers import LayerRerun

    model, inputs = _tiny_llava()
    lm = model.model.language_model
    with torch.no_grad(), LayerRerun(lm.layers[1], torch.float32) as rerun:
        model(**inputs, logits_to_keep=1, use_cache=True)
    assert rerun.reruns == 1
    s = rerun.scores
    assert s.shape == inputs["input_ids"].shape
    torch.testing.assert_close(s.sum(-1), torch.ones(2))  # the last token's softmax row, head-averaged


def test_bench_needs_cuda_without_tiny(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert cli.main(["--suite", "llava", "--out", "/tmp/never"]) == 2


def test_unknown_suite():
    with pytest.raises(SystemExit):
        cli.parse_suites("llava,nope")
    assert cli.parse_suites("new") == ["qwen-long", "llava-next", "peers", "maxbatch"]
    assert Bench(device="cpu").time_left() == float("inf")


def test_interleaved_rounds_and_paired_ratio():
    """timed_interleaved alternates the variants round by round; paired_ratio is the median of
    the per-round ratios (hand-computed), not the ratio of medians; short measurements get more
    rounds."""
    import contextlib

    from vtoken.bench.common import Bench, paired_ratio, rounds_for, timed_interleaved

    order = []
    variants = [(contextlib.nullcontext, lambda: order.append("a")), (contextlib.nullcontext, lambda: order.append("b"))]
    bench = Bench.__new__(Bench)
    bench.sync = lambda: None
    times = timed_interleaved(bench, variants, 3)
    assert order == ["a", "b"] * 4 and [len(t) for t in times] == [3, 3]  # one warm-up round
    assert paired_ratio([10.0, 30.0, 20.0], [5.0, 10.0, 20.0]) == 2.0  # ratios 2, 3, 1 -> 2
    assert paired_ratio([4.0, 30.0, 20.0], [1.0, 10.0, 40.0]) == 3.0  # ratio of medians: 20 / 10 = 2
    assert rounds_for(30.0, 3) == 41 and rounds_for(600.0, 3) == 5 and rounds_for(100.0, 3) == 15
    assert rounds_for(600.0, 9) == 9


def test_runtime_call_counts_from_profiler_events():
    from types import SimpleNamespace

    from vtoken.bench.common import runtime_call_counts

    names = ["cudaLaunchKernel", "aten::mm", "cuLaunchKernelEx", "cudaStreamSynchronize", "cudaMemcpyAsync",
             "cudaLaunchKernelExC", "cudaMemcpy", "cudaDeviceSynchronize", "cuLaunchKernel", "aten::add"]
    assert runtime_call_counts([SimpleNamespace(name=n) for n in names]) == {"launch": 4, "sync": 2, "memcpy": 2}
    assert runtime_call_counts([SimpleNamespace(name="aten::mm")]) == {}


def test_learned_methods_run_in_the_bench_with_model_shaped_networks(tmp_path):
    """``gtc`` / ``dyvte`` ship weights for the tiny checkpoints only; on the bench's models they get
    networks of the model's shapes (vtoken.bench.learned_weights): rows without errors, DyVTE's
    visual tokens all leave entering the middle layer and not before."""
    from vtoken.bench.learned_weights import FixedExitRouter, bench_weights

    out = tmp_path / "b"
    rc = cli.main(["--suite", "llava", "--tiny", "--device", "cpu", "--out", str(out), "--repeats", "1",
                   "--batch", "1,2", "--new-tokens", "2", "--methods", "gtc,dyvte", "--keep", "8"])
    data = json.loads((out / "results.json").read_text())
    assert rc == 0 and not data["meta"]["errors"], data["meta"]["errors"]
    model, _ = _tiny_llava()
    depth = model.config.get_text_config().num_hidden_layers
    for batch in (1, 2):
        (gtc,) = rows(data, suite="llava", batch=batch, method="gtc[auto]")
        kept = gtc["keep_arg"]  # keep 8 of 576, scaled to the tiny model's 36 tokens
        assert gtc["kept_per_stage"] == [kept]
        (dyvte,) = rows(data, suite="llava", batch=batch, method="dyvte[auto]")
        exit_stage = depth // 2 - 1  # the stages enter layers 1 .. depth-1; the exit enters depth // 2
        assert dyvte["kept_per_stage"] == [kept] * exit_stage + [0] * (depth - 1 - exit_stage), dyvte
    router = bench_weights("dyvte", model)["weights"]
    assert isinstance(router, FixedExitRouter) and router.num_layers == depth
    feat = torch.randn(3, 2 * model.config.get_text_config().hidden_size)
    decisions = [bool((router(feat, g)[:, 1] > router(feat, g)[:, 0]).all()) for g in range(depth)]
    assert decisions == [g >= depth // 2 - 1 for g in range(depth)]
    assert bench_weights("gtc", model)["weights"].heads == model.config.get_text_config().num_attention_heads
    assert bench_weights("fastv", model) == {}
