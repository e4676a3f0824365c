"""The learned scorers (vtoken.scorers.learned): GTC's relevance mapper and DyVTE's exit gates.

Relevance propagation against a hand-computed case, each scorer against a reference forward written
with loops and explicit matmuls, a training smoke test, weights lookup and its error, and the
shipped weights on the shipped checkpoint. The five invariants run in tests/test_core_invariants.py.
"""

import os

import pytest
import torch

import vtoken
from conftest import get_inputs, get_model
from tiny_models import learned_options
from vtoken.errors import MissingWeightsError
from vtoken.scorers.learned import (DyVTERouter, DyVTEScorer, GTCMapper, GTCScorer, load_learned, save_learned,
                                    weights_path)
from vtoken.scorers.testing import make_signals
from vtoken.zoo import train_learned as TL


# ----------------------------------------------------------------------------- relevance


def test_chefer_relevance_hand_computed():
    """Two layers, two heads, three tokens. Head 0 carries 2x the target products, head 1's products
    are negative (clamped away), so the head mean of (grad * attn)^+ is Abar1, Abar2 below; by hand:
    R1 = I + Abar1 = [[1,0,0],[.5,1,0],[.2,.3,1]]; R2 = R1 + Abar2 @ R1 adds R1's row 1 to row 2."""
    abar1 = torch.tensor([[0.0, 0, 0], [0.5, 0, 0], [0.2, 0.3, 0]])
    abar2 = torch.tensor([[0.0, 0, 0], [0.0, 0, 0], [0.0, 1.0, 0]])
    attn = [torch.stack([2 * a, a + 0.1]) for a in (abar1, abar2)]
    grads = [torch.stack([torch.ones(3, 3), -torch.ones(3, 3)]) for _ in range(2)]
    expected = torch.tensor([[1.0, 0, 0], [0.5, 1, 0], [0.7, 1.3, 1]], dtype=torch.float64)
    torch.testing.assert_close(TL.chefer_relevance(attn, grads), expected)


def test_relevance_of_the_checkpoint_matches_autograd_reference():
    """gtc_example's relevance == the rule applied to gradients taken with torch.autograd.grad."""
    from vtoken import zoo
    from vtoken.data.synthetic import make_split

    model, proc = zoo.load("vtoken/tiny-llava", attn_implementation="eager")
    rec = make_split("test", 1, 5)[0]
    ex = TL.gtc_example(model, proc, rec)
    inputs = TL._single_inputs(proc, rec)
    with torch.enable_grad():
        out = model(**inputs, output_attentions=True, use_cache=False)
        logit = out.logits[0, -1].max()
        grads = torch.autograd.grad(logit, out.attentions)
    R = torch.eye(inputs["input_ids"].shape[1], dtype=torch.float64)
    for a, g in zip(out.attentions, grads):
        R = R + (a[0].double() * g[0].double()).clamp(min=0).mean(0) @ R
    vis = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    torch.testing.assert_close(ex["relevance"], R[-1, vis].float())
    assert ex["maps"].shape == (model.config.text_config.num_attention_heads, 576) and ex["grid"] == (1, 24, 24)


# ----------------------------------------------------------------------------- reference forwards


def _gtc_reference(mapper, attn_text, after, counts, index, grids, budget):
    keeps = []
    for s, n in enumerate(counts):
        rows = [t for t in range(len(after[s])) if after[s][t]]
        H = attn_text[s].shape[0]
        t, h, w = grids[s]
        canvas = torch.zeros(H, t * h * w)
        for j in range(n):
            for c in range(H):
                canvas[c, index[s][j]] = sum(attn_text[s][c, r, j] for r in rows) / len(rows) * n
        x = canvas.view(H, t, h, w).transpose(0, 1)
        pred = mapper.net(x).reshape(-1)
        score = torch.tensor([pred[index[s][j]].item() for j in range(n)])
        order = sorted(range(n), key=lambda j: (-score[j].item(), j))
        keeps.append(sorted(order[: budget[s]]))
    return keeps


def test_gtc_selection_equals_reference_forward():
    torch.manual_seed(0)
    mapper = GTCMapper(heads=2, width=4).eval()
    counts, grids = [6, 9], [(1, 2, 3), (1, 3, 3)]
    index = [[5, 0, 3, 1, 4, 2], list(range(9))]  # a permuted segment: candidates scatter by original index
    attn_text = [torch.rand(2, 4, n) for n in counts]
    after = [[False, True, True, True], [False, False, True, True]]
    budget = [2, 4]
    sig = make_signals(counts, budget, text_counts=[4, 4], index=index, grid=grids, attn_text=attn_text,
                       text_after=after)
    keep = GTCScorer(mapper).select(sig).keep
    ref = _gtc_reference(mapper, attn_text, after, counts, index, grids, budget)
    for s in range(2):
        assert keep[s].nonzero().squeeze(1).tolist() == ref[s]


def test_gtc_without_a_grid_maps_one_row():
    """A segment without a grid (grid None: the adapter knows none, e.g. a count that tiles no
    rectangle) is mapped as one row of its tokens, (1, 1, n), by the candidates' original index."""
    torch.manual_seed(2)
    mapper = GTCMapper(heads=2, width=4).eval()
    counts = [7, 5]
    index = [[6, 2, 0, 5, 1, 3, 4], list(range(5))]
    attn_text = [torch.rand(2, 3, n) for n in counts]
    after = [[False, True, True], [True, True, True]]
    budget = [3, 2]
    for grid in (None, [None, None]):
        sig = make_signals(counts, budget, text_counts=[3, 3], index=index, grid=grid, attn_text=attn_text,
                           text_after=after)
        keep = GTCScorer(mapper).select(sig).keep
        ref = _gtc_reference(mapper, attn_text, after, counts, index, [(1, 1, n) for n in counts], budget)
        for s in range(2):
            assert keep[s].nonzero().squeeze(1).tolist() == ref[s]


def test_dyvte_selection_equals_reference_forward():
    torch.manual_seed(1)
    router = DyVTERouter(hidden_size=4, num_layers=3, hidden=5).eval()
    texts = [torch.randn(5, 4), torch.randn(3, 4), torch.randn(4, 4)]
    after = [[False, True, True, True, True], [True, True, True], [False, False, True, True]]
    counts, budget = [4, 5, 3], [2, 5, 3]
    attn_last = [torch.rand(2, n) for n in counts]
    for layer in range(3):
        sig = make_signals(counts, budget, text_counts=[5, 3, 4], text_hidden=texts, text_after=after,
                           attn_last=attn_last)
        sel = DyVTEScorer(router, layer).select(sig)
        W1, W2 = router.gates[layer][0].weight, router.gates[layer][2].weight
        for s, h in enumerate(texts):
            rows = [t for t in range(len(h) - 1) if after[s][t]]
            feat = torch.cat([h[rows].mean(0), h[-1]])
            logits = W2 @ torch.nn.functional.gelu(W1 @ feat)
            kept = sel.keep[s].nonzero().squeeze(1).tolist()
            assert bool(sig.diagnostics["dyvte_exit"][s]) == bool(logits[1] > logits[0])
            if logits[1] > logits[0]:
                assert kept == []
            else:
                score = attn_last[s].mean(0)
                order = sorted(range(counts[s]), key=lambda j: (-score[j].item(), j))
                assert kept == sorted(order[: budget[s]])


# ----------------------------------------------------------------------------- training, weights


def test_training_smoke_and_weights_roundtrip(tmp_path):
    torch.manual_seed(0)
    ex = [{"maps": torch.rand(2, 16), "relevance": torch.rand(16), "grid": (1, 4, 4)} for _ in range(6)]
    mapper, report = TL.train_gtc(ex[:4], ex[4:], heads=2, epochs=3, width=4)
    assert 0.0 <= report["heldout_mapper"]["recall@64"] <= 1.0 and -1 <= report["heldout_mapper"]["spearman"] <= 1
    data = {"feat": torch.randn(8, 3, 8), "label": torch.randint(0, 2, (8, 3))}
    router, rep = TL.train_dyvte(data, data, hidden_size=4, num_layers=4, epochs=5, hidden=6)
    assert len(rep["heldout_gate_accuracy_per_layer"]) == 3
    for method, module in (("gtc", mapper), ("dyvte", router)):
        path = weights_path(method, str(tmp_path))
        save_learned(module, path, extra=report)
        back = load_learned(method, checkpoint=str(tmp_path))
        assert type(back) is type(module)
        for a, b in zip(module.state_dict().values(), back.state_dict().values()):
            assert torch.equal(a, b)
    with pytest.raises(vtoken.PruningConfigError, match="holds weights of 'gtc'"):
        load_learned("dyvte", weights=weights_path("gtc", str(tmp_path)))


def test_training_on_mixed_grids_matches_the_scorer_layout():
    """train_gtc takes examples on different grids (dynamic resolution) and several frames, and feeds
    the mapper each (H, t*h*w) map as gtc_scores does: t frames of (H, h, w)."""
    torch.manual_seed(0)
    grids = [(1, 2, 3), (1, 3, 2), (2, 2, 2), (1, 2, 3)]
    ex = [{"maps": torch.rand(2, t * h * w), "relevance": torch.rand(t * h * w), "grid": (t, h, w)} for t, h, w in grids]
    mapper, report = TL.train_gtc(ex, ex, heads=2, epochs=2, width=4)
    assert -1 <= report["heldout_mapper"]["spearman"] <= 1
    for e in ex:
        n = e["maps"].shape[1]
        pred = TL._predict_gtc(mapper, [e])[0]
        torch.testing.assert_close(pred, mapper(TL._frames(e["maps"], e["grid"])).reshape(-1))
        assert pred.shape == (n,)


def test_gtc_example_grid_comes_from_the_adapter():
    """The trainer takes the visual positions and token grid from the model's adapter: Qwen2-VL's
    (t, h/merge, w/merge) of image_grid_thw, non-square for a non-square image (no 24 x 24 guess)."""
    from PIL import Image

    from vtoken import zoo
    from vtoken.data.synthetic import make_split

    model, proc = zoo.load("vtoken/tiny-qwen2vl", attn_implementation="eager")
    rec = dict(make_split("test", 1, 5)[0])
    rec["image"] = rec["image"].resize((336, 224), Image.BICUBIC)
    inputs = TL._single_inputs(proc, rec)
    t, h, w = (int(x) for x in inputs["image_grid_thw"][0])
    grid = (t, h // 2, w // 2)
    assert grid[1] != grid[2]
    ex = TL.gtc_example(model, proc, rec)
    n = grid[0] * grid[1] * grid[2]
    assert ex["grid"] == grid and ex["maps"].shape == (8, n) and ex["relevance"].shape == (n,)
    vis = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    assert torch.equal(TL._visual(model, inputs), vis)


def test_dyvte_labels_smoke():
    """Drop-all ablation labels and gate features on one question of the shipped checkpoint."""
    from vtoken import zoo
    from vtoken.data.synthetic import make_split

    model, proc = zoo.load("vtoken/tiny-llava")
    data = TL.dyvte_examples(model, proc, make_split("test", 1, 5))
    assert data["feat"].shape == (1, 5, 512) and data["label"].shape == (1, 5)
    assert set(data["label"].unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("method", ["gtc", "dyvte"])
def test_missing_weights_raise_with_the_training_command(method):
    model = get_model("llava")
    with pytest.raises(MissingWeightsError, match=f"python -m vtoken.zoo.train_learned --method {method}"):
        vtoken.apply_pruning(model, method=method, keep=8)
    assert vtoken.hooks.handle_of(model) is None


@pytest.mark.parametrize("checkpoint", ["vtoken/tiny-llava", "vtoken/tiny-qwen2vl", "vtoken/tiny-qwen2vl-video"])
@pytest.mark.parametrize("method", ["gtc", "dyvte"])
def test_shipped_weights_found_beside_the_checkpoint(method, checkpoint):
    """Every shipped checkpoint carries both methods' weights, and they load and prune (image questions)."""
    from vtoken import zoo

    model, proc = zoo.load(checkpoint)
    assert os.path.isfile(weights_path(method, zoo.resolve(checkpoint)))
    rec = __import__("vtoken.data.synthetic", fromlist=["make_split"]).make_split("test", 2, 5)
    with vtoken.apply_pruning(model, method=method, keep=64 if method == "gtc" else 1.0) as h:
        ans = zoo.answer(model, proc, [r["image"] for r in rec], [r["question"] for r in rec])
        assert len(ans) == 2
        kept = [st.kept for st in h.stats.stages]
    if method == "gtc":
        assert h.plan[0].layer == 1 and all(k.numel() == 64 for k in kept[0])
    else:
        assert len(h.plan) == 5


def test_video_checkpoint_gtc_prunes_each_clip_to_the_budget():
    """The video checkpoint's GTC weights (trained on its image questions) on video clips: the
    mapper reads each frame pair's map, and the stage keeps the budget's count of each clip's tokens."""
    from vtoken import zoo
    from vtoken.data import synthetic_video as sv

    model, proc = zoo.load("vtoken/tiny-qwen2vl-video")
    rec = sv.make_split("test", 2, 5)
    with vtoken.apply_pruning(model, method="gtc", keep=0.25) as h:
        assert len(zoo.answer(model, proc, [r["video"] for r in rec], [r["question"] for r in rec])) == 2
        kept = h.stats.stages[0].kept
    n = sv.visual_tokens()
    assert h.plan[0].layer == 1 and [k.numel() for k in kept] == [round(0.25 * n)] * 2


def test_learned_methods_on_tiny_models_prune(arch):
    """Both methods run on every adapter with weights given (batch with padding, several images)."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    for method, keep in (("gtc", 5), ("dyvte", 1.0)):
        with vtoken.apply_pruning(model, method=method, keep=keep, **learned_options(method, model)) as h:
            with torch.no_grad():
                model(**inputs)
            assert h.stats is not None


@pytest.mark.gpu
@pytest.mark.parametrize("checkpoint", ["vtoken/tiny-llava", "vtoken/tiny-qwen2vl"])
def test_learned_methods_run_on_cuda_under_inference_mode(checkpoint):
    """The weights load on the CPU; on a CUDA model the scorers move them to the signals' device
    (every gtc / dyvte answer failed in the GPU eval before: weights on cpu, inputs on cuda)."""
    from vtoken import zoo

    model, proc = zoo.load(checkpoint, device="cuda")
    rec = __import__("vtoken.data.synthetic", fromlist=["make_split"]).make_split("test", 4, 5)
    images, questions = [r["image"] for r in rec], [r["question"] for r in rec]
    for method, keep in (("gtc", 64), ("dyvte", 1.0)):
        with vtoken.apply_pruning(model, method=method, keep=keep) as h:
            assert len(zoo.answer(model, proc, images, questions)) == 4  # zoo.answer: inference_mode
            assert h.stats is not None and h.stats.stages


def test_learned_weights_follow_the_signals_device():
    from vtoken.scorers.learned import _on_device

    mapper = GTCMapper(heads=2, width=4)
    assert _on_device(mapper, torch.device("meta")) is mapper
    assert all(p.device.type == "meta" for p in mapper.parameters())


def _gtc_scores_per_segment(maps, mask, index, grid, mapper):
    """The per-segment loop gtc_scores replaced (session 11), kept as the reference: one mapper call
    and (without a grid) one host read per segment."""
    S, H, n = maps.shape
    out = torch.full((S, n), float("-inf"))
    for s in range(S):
        t, h, w = grid[s] if grid is not None and grid[s] is not None else (1, 1, int(index[s].max()) + 1)
        canvas = maps.new_zeros(H, t * h * w)
        real = mask[s]
        idx = index[s][real]
        canvas[:, idx] = maps[s][:, real]
        pred = mapper(canvas.view(H, t, h, w).transpose(0, 1)).reshape(-1)
        out[s, real] = pred[idx].float()
    return out


def test_gtc_scores_batched_by_grid_equal_the_per_segment_loop():
    """Segments on mixed grids (two on the same image grid, a 2-frame video, rows without a grid)
    with scattered candidates and padding: the batched scores equal the loop's, at most one host
    sync (the gridless rows' widths), and none when every segment has a grid."""
    from conftest import count_syncs
    from vtoken.scorers.learned import gtc_scores

    torch.manual_seed(0)
    mapper = GTCMapper(heads=3, width=5).eval()
    grids = [(1, 3, 4), (2, 2, 3), (1, 3, 4), None, None]
    S, H, n = len(grids), 3, 12
    maps = torch.rand(S, H, n)
    mask = torch.zeros(S, n, dtype=torch.bool)
    index = torch.zeros(S, n, dtype=torch.long)
    for s, (g, k) in enumerate(zip(grids, [12, 9, 5, 7, 10])):
        cells = 12 if g is None else g[0] * g[1] * g[2]
        slots = torch.randperm(n)[:k]
        mask[s, slots] = True
        index[s, slots] = torch.sort(torch.randperm(cells if g else 15)[:k]).values
    with torch.no_grad():
        want = _gtc_scores_per_segment(maps, mask, index, grids, mapper)
        got = gtc_scores(maps, mask, index, grids, mapper)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert count_syncs(lambda: gtc_scores(maps, mask, index, grids, mapper)) <= 1
        gridded = [0, 1, 2]
        assert count_syncs(lambda: gtc_scores(maps[gridded], mask[gridded], index[gridded],
                                              [grids[s] for s in gridded], mapper)) == 0
