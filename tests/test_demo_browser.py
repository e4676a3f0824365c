"""Drive the demo in a real headless browser: start ``demos/app.py`` on a free port, pick an
example, ask, and check that both answers and the kept-patch heatmap appear; then check that an
over-large upload is refused with a message in the page. The page screenshot is kept as
``test-artifacts/demo.png``.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and Playwright's Python package
(``pip install playwright``; its bundled browsers are never downloaded: Playwright launches
``/usr/bin/chromium``, or ``$VTOKEN_CHROMIUM``). Skipped with the reason when either is missing.

Model: ``$VTOKEN_DEMO_TEST_MODEL`` if set, else the shipped ``vtoken/tiny-llava`` checkpoint when it
is in the tree, else a random-weight model of its shape (``tiny-random``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("VTOKEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
START_TIMEOUT_S = 150
ANSWER_TIMEOUT_MS = 90_000

pytestmark = pytest.mark.browser


def _requirements():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the browser is Debian's chromium)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.skip("gradio is not installed (pip install gradio)")


def _model_args():
    if os.environ.get("VTOKEN_DEMO_TEST_MODEL"):
        return ["--model", os.environ["VTOKEN_DEMO_TEST_MODEL"]]
    import vtoken.zoo

    if (Path(vtoken.zoo.__file__).parent / "checkpoints" / "tiny-llava").is_dir():
        return []  # the default model
    return ["--model", "tiny-random"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _requirements()
    port = _free_port()
    log_path = tmp_path_factory.mktemp("demo") / "demo.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "demos" / "app.py"), *_model_args(), "--device", "cpu",
           "--port", str(port), "--max-new-tokens", "4", "--no-method-check"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo did not answer on {url} within {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield SimpleServer(url, port, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SimpleServer:
    def __init__(self, url, port, log_path):
        self.url, self.port, self.log_path = url, port, log_path


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="vtoken-chromium-")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        pg = ctx.new_page()
        pg.set_default_timeout(30_000)
        pg.requests_seen = []
        pg.on("request", lambda r: pg.requests_seen.append(r.url))
        try:
            yield pg
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def _value(page, elem_id):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def _wait_value(page, elem_id):
    page.wait_for_function(
        "id => { const t = document.querySelector(`#${id} textarea, #${id} input`); return t && t.value.length > 0; }",
        arg=elem_id, timeout=ANSWER_TIMEOUT_MS,
    )


def test_pick_example_ask_and_see_both_answers_and_heatmap(server, page):
    page.goto(server.url, wait_until="networkidle")
    page.wait_for_selector("#ask")
    # pick the first shipped example: it fills the image and the question
    page.locator("#examples [data-testid='dataset-cell-0-0']").click()
    page.wait_for_selector("#image-input img")
    question = _value(page, "question")
    assert question.endswith("?")
    page.locator("#ask").click()
    _wait_value(page, "answer-base")
    _wait_value(page, "answer-pruned")
    page.wait_for_function(
        "() => { const i = document.querySelector('#heatmap img'); return i && i.complete && i.naturalWidth > 0; }",
        timeout=ANSWER_TIMEOUT_MS,
    )
    status = page.locator("#status").inner_text()
    assert "Answered with fastv" in status, status
    assert _value(page, "answer-base") and _value(page, "answer-pruned")
    base_md = page.locator("#metrics-base").inner_text()
    pruned_md = page.locator("#metrics-pruned").inner_text()
    for text in (base_md, pruned_md):
        assert "time to first token" in text and "total time" in text and "tokens in context" in text
    assert "576 → 64" in pruned_md and "layer 2 (fastv)" in pruned_md
    size = page.evaluate("() => { const i = document.querySelector('#heatmap img'); return [i.naturalWidth, i.naturalHeight]; }")
    assert size[0] >= 336 and size[1] > 336, size
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    # the page works offline: everything it loaded came from the demo's own server
    foreign = [u for u in page.requests_seen if not u.startswith(("data:", "blob:", server.url))]
    assert not foreign, foreign


def test_over_large_upload_is_refused_in_the_page(server, page, tmp_path):
    from PIL import Image

    huge = tmp_path / "huge.png"
    Image.new("RGB", (5000, 4200), (200, 30, 30)).save(huge)  # 21 MP, a few hundred KB
    page.goto(server.url, wait_until="networkidle")
    page.locator("#question textarea, #question input").first.fill("what color is it?")
    page.locator("#image-input input[type=file]").set_input_files(str(huge))
    page.wait_for_selector("#image-input img")
    page.locator("#ask").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('too large')",
                           timeout=ANSWER_TIMEOUT_MS)
    status = page.locator("#status").inner_text()
    assert "21.0 megapixels" in status and "limit is 20" in status, status
    assert "Traceback" not in page.content()
    assert _value(page, "answer-pruned") == ""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-rejected.png"))
