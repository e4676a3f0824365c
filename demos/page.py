"""The Gradio page: its layout (:func:`build_app`, :func:`theme`, :data:`CSS`), the shipped
examples (:func:`example_rows`), and the callback that turns one request into the page's outputs
(:func:`handle_request`: answers, measurements as Markdown tables, the heatmap; bad input and
failures become a status message, never a traceback). Gradio is imported only when a page is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from PIL import Image

from vtoken.errors import VTokenError

from .answers import DEFAULT_METHOD, Answer, DemoEngine
from .uploads import MAX_PIXELS, DemoInputError, InvalidUpload, _bomb_message

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"


def _fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def metrics_markdown(ans: Answer, baseline: Optional[Answer] = None) -> str:
    rows = [("time to first token", _fmt_s(ans.ttft_s)), ("total time", _fmt_s(ans.total_s)),
            ("new tokens", str(ans.new_tokens))]
    if ans.method is None:
        rows += [("tokens in context", str(ans.context_tokens)), ("visual tokens", str(ans.visual_tokens))]
    else:
        rows += [("tokens in context", f"{ans.context_tokens} → {ans.context_after}"),
                 ("visual tokens", f"{ans.visual_tokens} → {ans.visual_after}")]
        for layer, scorer, kept, of in ans.stages:
            rows.append((f"stage: {'before LLM' if layer == 0 else f'layer {layer}'} ({scorer})", f"{kept} / {of} kept"))
        if ans.equivalent_tokens is not None:
            rows.append(("layer-averaged visual tokens", f"{ans.equivalent_tokens:.1f}"))
        if baseline is not None and ans.ttft_s > 0:
            rows.append(("TTFT vs unpruned", f"{baseline.ttft_s / ans.ttft_s:.2f}× faster"
                         if baseline.ttft_s >= ans.ttft_s else f"{ans.ttft_s / baseline.ttft_s:.2f}× slower"))
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def handle_request(engine: DemoEngine, image, question, method, keep, max_new_tokens):
    """The page's callback: ``(status, base answer, base metrics, base view, pruned answer,
    pruned metrics, heatmap)``. Bad input and failures come back as a status message, never as a
    traceback."""
    empty = ("", "", None, "", "", None)
    try:
        cmp = engine.compare(image, question, method=method, keep=keep, max_new_tokens=max_new_tokens)
    except DemoInputError as exc:
        return (f"**⚠ {exc}**",) + empty
    except VTokenError as exc:  # e.g. a method whose preset or signals this model cannot serve
        return (f"**⚠ Method {method} cannot run on this model:** {exc}",) + empty
    except Exception as exc:  # keep the page usable; the console gets the traceback
        import traceback

        traceback.print_exc()
        return (f"**⚠ The model failed on this request:** {type(exc).__name__}: {exc}",) + empty
    b, p = cmp.baseline, cmp.pruned
    budget = f"{p.keep} tokens" if isinstance(p.keep, int) else f"{p.keep:.0%}"
    status = f"✓ Answered with **{p.method}**, budget {budget} per image."
    return (status, b.text or "(empty answer)", metrics_markdown(b), cmp.view, p.text or "(empty answer)",
            metrics_markdown(p, b), cmp.heatmap)


def example_rows() -> list:
    """``[[image path, question], ...]`` of the shipped examples."""
    listing = EXAMPLES_DIR / "examples.json"
    if not listing.is_file():
        return []
    rows = []
    for item in json.loads(listing.read_text()):
        path = EXAMPLES_DIR / item["image"]
        if path.is_file():
            rows.append([str(path), item["question"]])
    return rows


CSS = """
#status {min-height: 2em}
.vt-panel {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px}
"""


def _tolerant_preprocess(component) -> None:
    """Make a ``gr.Image``'s upload decoding errors reach our handler as :class:`InvalidUpload`
    (shown as a message in the page) instead of Gradio's bare "Error" toast. Done on the instance:
    a ``gr.Image`` subclass would make Gradio write a ``.pyi`` stub beside this file."""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return InvalidUpload(type(exc).__name__, _bomb_message(exc, MAX_PIXELS))
        except Exception as exc:
            return InvalidUpload(type(exc).__name__)

    component.preprocess = preprocess


def build_app(engine: DemoEngine):
    """The Gradio Blocks page for ``engine`` (not launched)."""
    import gradio as gr

    methods = engine.methods
    method0 = DEFAULT_METHOD if DEFAULT_METHOD in methods else (methods[0] if methods else None)
    if engine.fixed_grid:
        n = engine.visual_tokens_per_image or 576
        budget = dict(minimum=1, maximum=n, value=min(64, n), step=1,
                      label=f"Budget: visual tokens kept per image (of {n})")
    else:
        budget = dict(minimum=1, maximum=100, value=25, step=1, label="Budget: % of visual tokens kept per image")

    with gr.Blocks(title="vtoken: visual-token pruning, side by side", analytics_enabled=False) as demo:
        gr.Markdown(
            "# vtoken — visual-token pruning, side by side\n"
            f"Model **{engine.model_name}** on **{engine.device}**"
            + (f", {engine.visual_tokens_per_image} visual tokens per image" if engine.visual_tokens_per_image else "")
            + ". Left: the unpruned model. Right: the same model with `vtoken.apply_pruning(model, method, keep)`."
        )
        if engine.note:
            gr.Markdown(f"⚠ {engine.note}", elem_id="model-note")
        if engine.unavailable:
            with gr.Accordion(f"{len(engine.unavailable)} method(s) not available for this model", open=False):
                gr.Markdown("\n".join(f"- **{m}**: {why}" for m, why in sorted(engine.unavailable.items())))
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="image-input", height=300)
                _tolerant_preprocess(image)
                question = gr.Textbox(label="Question", placeholder="e.g. what shape is the red object?",
                                      elem_id="question", max_lines=2)
                with gr.Row():
                    method = gr.Dropdown(methods, value=method0, label="Pruning method", elem_id="method")
                    max_new = gr.Slider(1, 64, value=engine.max_new_tokens, step=1, label="Max new tokens",
                                        elem_id="max-new-tokens")
                keep = gr.Slider(**budget, elem_id="budget")
                ask = gr.Button("Compare", variant="primary", elem_id="ask")
                rows = example_rows()
                if rows:
                    gr.Examples(rows, inputs=[image, question], label="Examples (click one)", elem_id="examples")
            with gr.Column(scale=2):
                status = gr.Markdown("Pick an example or upload an image, then press **Compare**.", elem_id="status")
                with gr.Row(equal_height=False):
                    with gr.Column(elem_classes="vt-panel"):
                        gr.Markdown("### Unpruned")
                        base_answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer-base")
                        base_metrics = gr.Markdown(elem_id="metrics-base")
                        base_view = gr.Image(label="All patches (the image as the model sees it)", type="numpy",
                                             interactive=False, elem_id="view-base", format="png", height=360)
                    with gr.Column(elem_classes="vt-panel"):
                        gr.Markdown("### Pruned")
                        pruned_answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer-pruned")
                        pruned_metrics = gr.Markdown(elem_id="metrics-pruned")
                        heatmap = gr.Image(label="Kept patches per stage (dim = pruned)",
                                           type="numpy", interactive=False, elem_id="heatmap", format="png",
                                           height=360)

        def run(img, q, m, k, mx):
            return handle_request(engine, img, q, m, k, mx)

        outputs = [status, base_answer, base_metrics, base_view, pruned_answer, pruned_metrics, heatmap]
        ask.click(run, [image, question, method, keep, max_new], outputs, concurrency_limit=1)
        question.submit(run, [image, question, method, keep, max_new], outputs, concurrency_limit=1)
    return demo


def theme():
    """Gradio's default theme with system fonts (no web-font downloads: the page works offline)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])
