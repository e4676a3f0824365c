"""The demo's core, without a browser: both answers, the heatmap, input checks, lock isolation.

Runs on a random-weight LLaVA of the tiny-llava shape (576 visual tokens, 24 x 24 grid).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import vtoken
from vtoken.demo import load_app
from vtoken.errors import PruningConfigError

app = load_app()


@pytest.fixture(scope="module")
def engine():
    return app.DemoEngine.from_pretrained(app.RANDOM_MODEL, device="cpu", max_new_tokens=3)


@pytest.fixture(scope="module")
def example():
    rows = app.example_rows()
    assert len(rows) >= 3, "demos/examples/examples.json lists the shipped examples"
    return rows[0]


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_examples_are_small_pngs():
    for path, question in app.example_rows():
        img = Image.open(path)
        assert img.format == "PNG" and img.size == (336, 336) and question.endswith("?")
        assert (app.EXAMPLES_DIR / path).stat().st_size < 50_000


def test_compare_answers_both_ways(engine, example):
    engine.answer(app.load_image(example[0]), example[1], None, None, 1)  # transformers adds its own hooks once
    hooks_before = _hook_count(engine.model)
    cmp = engine.compare(example[0], example[1], method="fastv", keep=64)
    b, p = cmp.baseline, cmp.pruned
    for ans in (b, p):
        assert isinstance(ans.text, str)
        assert 0 < ans.ttft_s <= ans.total_s
        assert 1 <= ans.new_tokens <= 3
        assert ans.context_tokens > ans.visual_tokens == 576
    assert b.method is None and b.stages == [] and b.context_after is None
    assert p.method == "fastv" and p.visual_after == 64
    assert p.context_after == b.context_tokens - 576 + 64
    assert p.stages == [(2, "fastv", 64, 576)]
    # the heatmap: one 24 x 24 mask per stage, 64 patches kept; one captioned 336 px tile per stage
    assert cmp.masks.shape == (1, 24, 24) and cmp.masks.dtype == bool and int(cmp.masks.sum()) == 64
    assert cmp.heatmap.dtype == np.uint8 and cmp.heatmap.ndim == 3 and cmp.heatmap.shape[2] == 3
    assert cmp.heatmap.shape[1] == 336 and cmp.heatmap.shape[0] > 336
    # pruning never outlives the request
    assert "_vtoken_handle" not in engine.model.__dict__
    assert _hook_count(engine.model) == hooks_before


def test_budget_as_fraction_and_handler_output(engine, example):
    out = app.handle_request(engine, example[0], example[1], "uniform", 100, 2)
    status, base_text, base_md, view, pruned_text, pruned_md, heat = out
    assert status.startswith("✓") and "uniform" in status
    assert base_text and pruned_text
    assert "time to first token" in base_md and "576 → 100" in pruned_md
    assert isinstance(heat, np.ndarray) and heat.shape[2] == 3
    assert view.shape == (336, 336, 3)


def test_model_view_is_what_the_vision_tower_saw(engine, example):
    img = app.load_image(example[0])
    inputs = engine._inputs(img, example[1])
    view = app.model_view(inputs, engine.processor, img)
    assert view.shape == (336, 336, 3) and view.dtype == np.uint8
    # un-normalised pixels match the example (336 px already: resize + crop are the identity)
    assert np.abs(view.astype(int) - np.asarray(img).astype(int)).mean() < 3


def _fake_stats(kept_per_stage, n=576, grid=(1, 24, 24), offset=0, scores=True):
    stages = []
    for layer, kept in kept_per_stage:
        sc = torch.full((offset + n,), float("nan"))
        if scores:
            sc[torch.tensor(kept, dtype=torch.long)] = torch.rand(len(kept))
        stages.append(SimpleNamespace(layer=layer, scorer="fake", kept=[torch.tensor(kept, dtype=torch.long)],
                                      counts=[[len(kept)]], scores=[sc]))
    seg = SimpleNamespace(offset=offset, length=n, grid=grid)
    return SimpleNamespace(stages=stages, segments=[[seg]], visual_tokens=[offset + n], context_tokens=[(None, 0)])


def test_heatmap_per_stage_and_index_mapping():
    first = list(range(0, 576, 2))  # every other patch
    second = [0, 25, 575]  # row 0 col 0, row 1 col 1, row 23 col 23
    stats = _fake_stats([(2, first), (6, second)])
    masks, scores, labels = app.kept_masks(stats)
    assert masks.shape == (2, 24, 24) and scores.shape == (2, 24, 24)
    assert masks[0].sum() == 288 and masks[0][0, 0] and not masks[0][0, 1]
    assert masks[1].sum() == 3 and masks[1][0, 0] and masks[1][1, 1] and masks[1][23, 23]
    assert labels[0] == "layer 2 · fake · kept 288/576" and labels[1].startswith("layer 6")
    heat = app.render_heatmap(np.full((336, 336, 3), 200, np.uint8), masks, scores, labels)
    assert heat.shape == (22 + 336, 2 * 336 + 8, 3)
    # kept patches keep their brightness, pruned ones are dimmed
    tile = heat[22:, :336].astype(float)
    assert tile[:14, :14].mean() > tile[:14, 14:28].mean() + 30


def test_heatmap_segment_offset_and_no_grid():
    # a segment that starts at visual index 10 and has no grid (square guessed: 16 -> 4 x 4)
    stats = _fake_stats([(0, [10, 11, 25])], n=16, grid=None, offset=10, scores=False)
    masks, _, labels = app.kept_masks(stats)
    assert masks.shape == (1, 4, 4)
    assert masks[0][0, 0] and masks[0][0, 1] and masks[0][3, 3] and masks.sum() == 3
    assert labels[0].startswith("before the LLM")
    # no grid and not a square: the factorisation closest to the image's aspect ratio (Qwen-style)
    wide = _fake_stats([(2, [0, 20, 272])], n=273, grid=None, scores=False)
    masks, _, _ = app.kept_masks(wide, aspect=500 / 300)
    assert masks.shape == (1, 13, 21) and masks[0][0, 0] and masks[0][0, 20] and masks[0][12, 20]
    heat = app.render_heatmap(np.zeros((300, 500, 3), np.uint8), masks, np.full(masks.shape, np.nan), ["x"])
    assert heat.shape == (22 + 336, round(336 * 21 / 13), 3)
    # LLaVA-NeXT: no grid, base view (4 x 4 here) first, then high-resolution tokens and newlines
    anyres = _fake_stats([(2, [0, 5, 15, 16, 40])], n=52, grid=None, scores=False)
    masks, _, labels = app.kept_masks(anyres, base_side=4)
    assert masks.shape == (1, 4, 4) and masks.sum() == 3 and masks[0][1, 1] and masks[0][3, 3]
    empty = app.kept_masks(None)
    assert empty[0].shape[0] == 0
    assert app.render_heatmap(np.zeros((10, 10, 3), np.uint8), *empty).shape == (22 + 336, 336, 3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "upload an image"),
        (lambda d: _write(d / "notes.png", b"this is text, not an image"), "not an image"),
        (lambda d: _write(d / "big.png", b"\x89PNG" + bytes(11 * 2**20)), "too large: 11.0 MB"),
        (lambda d: _save(Image.new("1", (5000, 4100)), d / "huge.png"), "20.5 megapixels"),
        (lambda d: Image.new("L", (6000, 4000)), "24.0 megapixels"),
        (lambda d: app.InvalidUpload("UnidentifiedImageError"), "not an image"),
    ],
)
def test_rejects_bad_images(tmp_path, make, message):
    obj = make(tmp_path)
    with pytest.raises(app.DemoInputError, match=message):
        app.load_image(obj)


def test_handler_reports_bad_inputs_in_the_page(engine, example, tmp_path):
    bad = _write(tmp_path / "x.jpg", b"GIF89a garbage")
    cases = [
        ((bad, "what?", "fastv", 64), "not an image"),
        ((example[0], "   ", "fastv", 64), "type a question"),
        ((example[0], "what?", "no-such-method", 64), "Unknown method"),
        ((example[0], "what?", "fastv", 0), "between 1 and 576"),
        ((example[0], "what?", "fastv", "lots"), "must be a number"),
    ]
    for args, message in cases:
        status, *rest = app.handle_request(engine, *args, 2)
        assert status.startswith("**⚠") and message in status, status
        assert rest == ["", "", None, "", "", None]


def test_method_errors_are_messages_and_warm_up_hides_them(engine, example, monkeypatch):
    real_apply = vtoken.apply_pruning

    def apply(model, method="fastv", keep=64, **kw):
        if method == "boom":
            raise PruningConfigError("stage layer 8 is outside the model's 4 decoder layers")
        return real_apply(model, method=method, keep=keep, **kw)

    monkeypatch.setattr(vtoken, "apply_pruning", apply)
    monkeypatch.setattr(vtoken, "available_methods", lambda: ["boom", "fastv", "none"])
    monkeypatch.setattr(engine, "unavailable", {})
    assert engine.methods == ["boom", "fastv"]
    status, *_ = app.handle_request(engine, example[0], example[1], "boom", 64, 1)
    assert "cannot run on this model" in status and "layer 8" in status
    assert "_vtoken_handle" not in engine.model.__dict__
    assert engine.warm_up() == {"boom": "stage layer 8 is outside the model's 4 decoder layers"}
    assert engine.methods == ["fastv"]


def test_concurrent_requests_never_mix(engine, example):
    """Requests with different methods/budgets, and an unpruned one, from several threads at once:
    each result carries exactly its own pruning (the engine's lock serialises model use)."""
    jobs = [("fastv", 16), ("uniform", 100), ("random", 40), (None, None), ("fastv", 200)]
    results = {}
    errors = []
    barrier = threading.Barrier(len(jobs))

    def work(i, method, keep):
        try:
            barrier.wait()
            if method is None:
                results[i] = engine.answer(app.load_image(example[0]), example[1], None, None, 2)[0]
            else:
                results[i] = engine.compare(example[0], example[1], method=method, keep=keep, max_new_tokens=2)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, m, k)) for i, (m, k) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, (method, keep) in enumerate(jobs):
        r = results[i]
        if method is None:
            assert r.stages == [] and r.context_after is None
            continue
        assert r.pruned.method == method and r.pruned.visual_after == keep
        assert [s[1] for s in r.pruned.stages] == [method] and int(r.masks[-1].sum()) == keep
        assert r.baseline.stages == []
    assert "_vtoken_handle" not in engine.model.__dict__


def test_cli_entry_point_help(capsys):
    pytest.importorskip("gradio")
    from vtoken import demo

    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--device", "--host", "--port"):
        assert flag in out
    args = app.parse_args([])
    assert args.host == "127.0.0.1" and args.model == app.DEFAULT_MODEL


def test_page_builds(engine, tmp_path):
    gr = pytest.importorskip("gradio")
    from gradio.data_classes import ImageData

    page = app.build_app(engine)
    assert isinstance(page, gr.Blocks)
    blocks = {getattr(b, "elem_id", None): b for b in page.blocks.values()}
    assert {"image-input", "question", "method", "budget", "ask", "answer-base", "answer-pruned", "heatmap",
            "view-base", "status"} <= set(blocks)
    assert blocks["method"].choices and all(c[0] != "none" for c in blocks["method"].choices)
    # a non-image that reaches the server becomes a message for the page, not a Gradio error
    fake = tmp_path / "fake.png"
    fake.write_text("not a png")
    got = blocks["image-input"].preprocess(ImageData(path=str(fake), orig_name="fake.png"))
    assert isinstance(got, app.InvalidUpload)
    assert "not an image" in app.handle_request(engine, got, "what?", "fastv", 64, 1)[0]
    assert not (app.EXAMPLES_DIR.parent / "app.pyi").exists()  # Gradio writes stubs for Component subclasses


def _write(path, data):
    path.write_bytes(data)
    return str(path)


def _save(img, path):
    img.save(path)
    return str(path)


def test_dynamic_resolution_model_budget_is_a_percentage():
    """Qwen2-VL (dynamic resolution): the budget is a percentage, the grid follows the image."""
    qwen = app.DemoEngine.from_pretrained("tiny-random-qwen2vl", device="cpu", max_new_tokens=1)
    assert not qwen.fixed_grid
    img = Image.open(app.example_rows()[0][0]).resize((504, 280))
    cmp = qwen.compare(img, "what shape is the green object?", method="uniform", keep=25)
    n = cmp.pruned.visual_tokens
    assert cmp.pruned.keep == 0.25 and abs(cmp.pruned.visual_after - 0.25 * n) <= 1
    h, w = cmp.masks.shape[1:]
    assert h * w == n and w > h  # a wide image gives a wide token grid
    assert int(cmp.masks.sum()) == cmp.pruned.visual_after
    assert cmp.view.shape == (280, 504, 3)  # the image itself (Qwen's pixels are flattened patches)
    status, *_ = app.handle_request(qwen, img, "what?", "uniform", 0, 1)
    assert "percentage" in status
