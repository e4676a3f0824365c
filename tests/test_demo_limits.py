"""The demo's size limits (issue 15, item 8): an image is judged by the size the model's processor
would make of it, and by its aspect ratio, before the processor (or PIL's decoder) touches it.

A 661-byte 20000 x 10 PNG is 0.2 megapixels, but LLaVA's processor resizes its short side to 336 px
first: 672000 x 336 = 226 megapixels. These tests build such files with PIL (tiny in bytes), check
they are refused quickly with a message naming the limit and what was given, with the processor
never called, and check :func:`expected_processed_size` against what the real processors make.
"""

from __future__ import annotations

import struct
import time
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

import vtoken.zoo
from vtoken.demo import load_app
from vtoken.zoo.processing import load_processor

app = load_app()

CHECKPOINTS = Path(vtoken.zoo.__file__).parent / "checkpoints"


@pytest.fixture(scope="module")
def engine():
    return app.DemoEngine.from_pretrained(app.RANDOM_MODEL, device="cpu", max_new_tokens=1)


class _ProcessorSpy:
    """Stands in for the engine's processor: attributes (its resize settings) come from the real
    one, but calling it — or its image processor — fails the test at once (no 226 MP resize)."""

    def __init__(self, real):
        self._real = real
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise AssertionError("the processor was called")

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def spied(engine, monkeypatch):
    spy = _ProcessorSpy(engine.processor)
    ip_calls = []

    def preprocess(*args, **kwargs):
        ip_calls.append(1)
        raise AssertionError("the image processor was called")

    monkeypatch.setattr(engine.processor.image_processor, "preprocess", preprocess)
    monkeypatch.setattr(engine, "processor", spy)
    return spy, ip_calls


def _png(path, size, mode="L"):
    Image.new(mode, size, 255).save(path)
    return str(path)


def _png_header_only(path, width, height):
    """A PNG whose header says ``width`` x ``height`` (with no pixel data): what a decompression
    bomb looks like to anything that reads only the header."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return str(path)


# ----------------------------------------------------------------------------- the reported case
def test_tiny_long_png_is_refused_quickly_without_the_processor(engine, spied, tmp_path):
    spy, ip_calls = spied
    path = _png(tmp_path / "long.png", (20000, 10))
    assert Path(path).stat().st_size < 2000  # tiny in bytes, 0.2 megapixels: the old checks let it through
    t0 = time.perf_counter()
    status, *rest = app.handle_request(engine, path, "what is this?", "fastv", 64, 1)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, elapsed
    assert status.startswith("**⚠"), status
    assert "2000:1" in status and "20:1" in status and "20000 × 10" in status, status
    assert rest == ["", "", None, "", "", None]
    assert spy.calls == 0 and ip_calls == []
    # the same image handed to the engine directly (no load_image) is refused before the processor too
    with pytest.raises(app.DemoInputError, match="2000:1"):
        engine.answer(Image.new("L", (20000, 10)), "what is this?")
    assert spy.calls == 0 and ip_calls == []


def test_expected_size_of_the_reported_case_is_computed_not_resized(engine):
    t0 = time.perf_counter()
    out = app.expected_processed_size(engine.processor, 20000, 10)
    assert time.perf_counter() - t0 < 0.1
    assert out.kind == "resize" and out.resized == (672000, 336) and out.output == (336, 336)
    assert out.pixels == 672000 * 336


def test_normal_image_passes(engine, tmp_path):
    path = _png(tmp_path / "photo.png", (640, 480), "RGB")
    app.check_image_size(640, 480, engine.processor)
    img = app.load_image(path, processor=engine.processor)
    assert img.size == (640, 480) and img.mode == "RGB"
    status, *_ = app.handle_request(engine, path, "what is this?", "fastv", 64, 1)
    assert status.startswith("✓"), status
    # at the aspect-ratio limit exactly: accepted
    app.check_image_size(4000, 200, engine.processor)


# ----------------------------------------------------------------------------- aspect ratio
@pytest.mark.parametrize(
    "size, message",
    [((4200, 200), r"too wide: 4200 × 200 pixels has an aspect ratio of 21:1; the limit is 20:1"),
     ((10, 3000), r"too tall: 10 × 3000 pixels has an aspect ratio of 300:1; the limit is 20:1"),
     ((60000, 5), r"12000:1")],
)
def test_extreme_aspect_ratio_is_refused(engine, spied, tmp_path, size, message):
    spy, ip_calls = spied
    with pytest.raises(app.DemoInputError, match=message):
        app.check_image_size(*size)
    path = _png(tmp_path / "x.png", size)
    status, *_ = app.handle_request(engine, path, "what?", "fastv", 64, 1)
    assert "aspect ratio" in status and "20:1" in status, status
    assert spy.calls == 0 and ip_calls == []


# ----------------------------------------------------------------------------- size after the processor
def test_processor_configured_bigger_is_refused_by_its_output_size(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(size={"shortest_edge": 2048}, crop_size={"height": 2048, "width": 2048})
    ip.preprocess = None  # calling it would fail
    # 1900 x 100: 0.19 megapixels and 19:1, both allowed; the processor would make it 38912 x 2048
    out = app.expected_processed_size(ip, 1900, 100)
    assert out.resized == (38912, 2048)
    path = _png(tmp_path / "banner.png", (1900, 100))
    with pytest.raises(app.DemoInputError, match=r"1900 × 100 pixels becomes 38912 × 2048 \(79\.7 megapixels\).*limit is 20 megapixels"):
        app.load_image(path, processor=ip)
    app.load_image(path)  # without a processor only the input checks apply
    app.check_image_size(300, 200, ip)  # 3072 x 2048 = 6.3 MP: fine


def _qwen_processor():
    return load_processor(str(CHECKPOINTS / "tiny-qwen2vl"))


def _llava_processor():
    return load_processor(str(CHECKPOINTS / "tiny-llava"))


SIZES = [(500, 300), (300, 500), (333, 777), (64, 7), (50, 30), (1500, 1000), (1000, 50), (336, 336)]


@pytest.mark.parametrize("size", SIZES)
def test_expected_size_matches_the_shipped_llava_processor(size):
    proc = _llava_processor()
    img = Image.new("RGB", size, (90, 120, 200))
    out = app.expected_processed_size(proc, *size)
    resized = proc.image_processor(img, do_center_crop=False, return_tensors="np")["pixel_values"].shape
    final = proc.image_processor(img, return_tensors="np")["pixel_values"].shape
    assert out.kind == "resize"
    assert out.resized == (resized[3], resized[2])
    assert out.output == (final[3], final[2]) == (336, 336)


@pytest.mark.parametrize("size", SIZES)
def test_expected_size_matches_the_shipped_qwen2vl_processor(size):
    proc = _qwen_processor()
    ip = proc.image_processor
    got = ip(Image.new("RGB", size, (90, 120, 200)), return_tensors="np")["image_grid_thw"][0]
    out = app.expected_processed_size(proc, *size)
    assert out.kind == "smart_resize"
    assert out.resized == out.output == (int(got[2]) * ip.patch_size, int(got[1]) * ip.patch_size)


@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("size", SIZES)
def test_expected_size_matches_anyres_processors(kind, size):
    if kind == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    else:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        ip = LlavaOnevisionImageProcessorPil()
    seen = {}
    real = ip._resize_for_patching

    def resize_for_patching(image, *args, **kwargs):
        seen["shape"] = (out := real(image, *args, **kwargs)).shape  # C, H, W
        return out

    ip._resize_for_patching = resize_for_patching
    pv = ip(Image.new("RGB", size, (90, 120, 200)), return_tensors="np")["pixel_values"]  # 1, views, C, H, W
    out = app.expected_processed_size(ip, *size)
    assert out.kind == "anyres"
    assert out.resized == (seen["shape"][2], seen["shape"][1])
    assert out.views == pv.shape[1] and out.output == (pv.shape[4], pv.shape[3])


# ----------------------------------------------------------------------------- decompression bombs
def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 20000, 10000)  # 200 megapixels, under 100 bytes
    t0 = time.perf_counter()
    with pytest.raises(app.DemoInputError, match=r"too large: 200\.0 megapixels; the limit is 20 megapixels"):
        app.load_image(path)
    assert time.perf_counter() - t0 < 1.0


def test_bomb_upload_through_gradio_gets_a_size_message(engine, tmp_path):
    gr = pytest.importorskip("gradio")
    from gradio.data_classes import ImageData

    component = gr.Image(type="filepath", image_mode=None)
    app._tolerant_preprocess(component)
    # over twice PIL's own limit: PIL refuses it while Gradio opens the upload
    path = _png_header_only(tmp_path / "bomb.png", 40000, 40000)
    got = component.preprocess(ImageData(path=path, orig_name="bomb.png"))
    assert isinstance(got, app.InvalidUpload)
    status = app.handle_request(engine, got, "what?", "fastv", 64, 1)[0]
    assert "too large: 1600.0 megapixels; the limit is 20 megapixels" in status, status


def test_harden_pil_lowers_the_bomb_limit_for_the_whole_process(engine, tmp_path, monkeypatch):
    gr = pytest.importorskip("gradio")
    from gradio.data_classes import ImageData

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    component = gr.Image(type="filepath", image_mode=None)
    app._tolerant_preprocess(component)
    path = _png_header_only(tmp_path / "big.png", 6000, 5000)  # 30 MP: under PIL's default limit
    with warnings.catch_warnings():
        assert component.preprocess(ImageData(path=path, orig_name="big.png")) == path  # Gradio lets it through
        app.harden_pil()
        assert Image.MAX_IMAGE_PIXELS == app.MAX_PIXELS
        got = component.preprocess(ImageData(path=path, orig_name="big.png"))  # now PIL refuses it on open
        assert isinstance(got, app.InvalidUpload) and "30.0 megapixels" in got.message
        with pytest.raises(Image.DecompressionBombWarning):
            Image.open(path)
        status = app.handle_request(engine, got, "what?", "fastv", 64, 1)[0]
        assert "too large: 30.0 megapixels; the limit is 20 megapixels" in status, status
