"""``vtoken bench --suite video --tiny``: the video suite's rows on the CPU (tiny Qwen2.5-VL of the
same classes): token counts against hand-computed budgets, one oracle row per pruned row fed
exactly the kept tokens, refused methods as skipped rows with their reason, the time budget."""

import json
import time

import pytest
import torch

from vtoken.bench import cli

# tiny Qwen2.5-VL: 8 frames of 448 px -> 4 temporal groups x (448 / 14 / 4 = 8)^2 patches = 256
# patches -> 64 visual tokens after the 2 x 2 merge; keep 0.25 -> 16; HoliTom's second stage
# (layer 18 of 28 scaled to layer 2 of the tiny 4-layer LM) keeps 16 * (1 - 0.5) = 8
VISUAL, KEPT, HOLITOM_SECOND = 64, 16, 8
OTHER = 37  # 3 head + <vision_start> + <vision_end> + 32 text tokens


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_video")
    argv = ["--suite", "video", "--tiny", "--device", "cpu", "--out", str(out), "--repeats", "1", "--new-tokens", "3",
            "--video-batch", "1,2", "--video-frames", "8", "--video-methods", "dycoke,holitom,visionzip"]
    rc = cli.main(argv)
    with open(out / "results.json") as f:
        data = json.load(f)
    return rc, data, (out / "results.md").read_text()


def test_video_suite_rows(video_run):
    rc, data, md = video_run
    assert rc == 0 and not data["meta"]["errors"], data["meta"]["errors"]
    assert data["meta"]["suites"] == ["video"]
    rows = data["results"]
    assert {r["suite"] for r in rows} == {"video"}
    assert [r["batch"] for r in rows if r["method"] == "unpruned"] == [1, 2]
    for B in (1, 2):
        rs = [r for r in rows if r["batch"] == B]
        # unpruned, then each method's pruned row followed by its oracle, then the refused method
        assert [r["method"] for r in rs] == ["unpruned", "dycoke[auto]", "oracle", "holitom[auto]", "oracle",
                                             "visionzip"]
        base = rs[0]
        assert base["visual_tokens"] == VISUAL and base["context"] == VISUAL + OTHER
        assert base["video_grid_thw"] == [4, 8, 8] and base["frames"] == 8 and base["video_side"] == 448
        for pruned, oracle, stages in ((rs[1], rs[2], [KEPT]), (rs[3], rs[4], [KEPT, HOLITOM_SECOND])):
            assert pruned["keep"] == 0.25 and pruned["kept_per_stage"] == stages
            assert pruned["kept_visual"] == stages[-1]
            assert pruned["context_after"] == base["context"] - VISUAL + stages[-1]
            # the oracle is fed exactly the tokens the pruned run kept after its last stage
            assert oracle["keep"] == pruned["keep"] and oracle["kept_visual"] == pruned["kept_visual"]
            assert oracle["context_after"] == pruned["context_after"]
            assert pruned["ratio_to_oracle"] > 0 and pruned["ttft_ms"] > 0 and oracle["ttft_ms"] > 0
            assert pruned["decode_ms_per_token"] > 0 and pruned["runs"] == oracle["runs"] >= 5
            assert pruned["kv_cache_bytes"] < base["kv_cache_bytes"]
        # one stage at layer 0: every layer of both holds the same tokens -> the same KV cache;
        # HoliTom's layers before its second stage hold more than the oracle's
        assert rs[1]["kv_cache_bytes"] == rs[2]["kv_cache_bytes"]
        assert rs[3]["kv_cache_bytes"] > rs[4]["kv_cache_bytes"]
        assert base["decode_ms_per_token"] > 0 and base["kept_visual"] == VISUAL
        skipped = rs[5]
        assert "ttft_ms" not in skipped and skipped["keep"] == 0.25
        assert skipped["skipped"].startswith("PruningConfigError:") and "vision-encoder attention" in skipped["skipped"]
    assert "## video:" in md and "PruningConfigError" in md
    assert "| batch | method | keep |" in md


def test_video_suite_time_budget():
    """Nothing starts after the deadline: the batch is listed as skipped, no rows."""
    from vtoken.bench.common import Bench
    from vtoken.bench.models import ModelPool
    from vtoken.bench.video_suite import run_video

    bench = Bench(device="cpu", dtype=torch.float32, tiny=True, repeats=1, new_tokens=2,
                  deadline=time.monotonic() - 1.0, quiet=True)
    assert run_video(bench, ModelPool(bench, {"qwen2.5-vl-7b"}), batches=(1, 8), frames=4, methods=("dycoke",)) == {}
    assert bench.rows == [] and bench.skipped == ["video: batch 1 and later (time budget)"]


def test_video_inputs_and_bad_shapes():
    from vtoken.bench import models as M

    torch.manual_seed(0)
    model = M.build_qwen25_vl(True, "cpu", torch.float32)
    assert M.qwen_video_grid(model, 16, 448, tiny=False) == (8, 32, 32)  # 2048 tokens at full size
    assert M.qwen_video_grid(model, 16, 448, tiny=True) == (8, 8, 8)
    for frames, side in ((15, 448), (16, 440), (0, 448)):
        with pytest.raises(ValueError):
            M.qwen_video_grid(model, frames, side, tiny=False)
    inputs = M.qwen_video_inputs(model, 2, (2, 4, 4))
    assert inputs["pixel_values_videos"].shape == (2 * 32, 3 * 2 * 2 * 2)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]] * 2
    assert int((inputs["input_ids"][0] == model.config.video_token_id).sum()) == 8
    assert torch.equal((inputs["mm_token_type_ids"] == 2), inputs["input_ids"] == model.config.video_token_id)
    # each sample its own video: the two samples' features differ, so a batch is two videos
    px = inputs["pixel_values_videos"]
    assert not torch.equal(px[:32], px[32:])


def test_oracle_feed_on_video_batch():
    """The oracle on a video batch (3-D M-RoPE positions, batch 2): fed every token it is the model;
    fed a subset it is the language model on that subset at its original positions."""
    from vtoken.bench import models as M
    from vtoken.bench.common import OracleFeed

    torch.manual_seed(0)
    model = M.build_qwen25_vl(True, "cpu", torch.float32)
    inputs = M.qwen_video_inputs(model, 2, (2, 4, 4))
    lm = model.model.language_model
    N = inputs["input_ids"].shape[1]
    seen = {}
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        full = model(**inputs, logits_to_keep=1).logits
    h.remove()
    with torch.no_grad(), OracleFeed(lm, torch.arange(N).expand(2, N), N):
        torch.testing.assert_close(model(**inputs, logits_to_keep=1).logits, full)
    idx = torch.tensor([[0, 1, 2, 3, 5, 8, 9, 12] + list(range(20, N)), [0, 1, 2, 3, 4, 6, 7, 11] + list(range(20, N))])
    with torch.no_grad(), OracleFeed(lm, idx, N) as feed:
        got = model(**inputs, logits_to_keep=1).logits
    assert feed.fed == [idx.shape[1]]
    emb, pos = seen["inputs_embeds"], seen["position_ids"]
    e = emb.gather(1, idx.unsqueeze(-1).expand(*idx.shape, emb.shape[-1]))
    p = pos.gather(-1, idx.expand(pos.shape[0], *idx.shape))
    with torch.no_grad():
        want = model.lm_head(lm(inputs_embeds=e, position_ids=p).last_hidden_state[:, -1:])
    torch.testing.assert_close(got, want)
