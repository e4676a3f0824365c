"""vtoken's side-by-side demo: the same question answered by the unpruned and the pruned model.

Run (from the repository root)::

    python demos/app.py                       # the shipped vtoken/tiny-llava; CUDA if available, else CPU
    python demos/app.py --model PATH --device cuda --port 7860
    vtoken demo --model PATH                  # the same, through the CLI

Upload an image (or pick a shipped example), ask a question, pick a method and a budget. The left
panel is the unpruned model, the right one the same model with ``vtoken.apply_pruning`` attached;
each shows the answer, time to first token, total time and tokens in context, and the right one a
heatmap of the patches each pruning stage kept, drawn on the image as the model sees it.

Design choices
--------------
* **Concurrency: one model, one lock.** Both answers of a request run while holding
  :attr:`DemoEngine.lock`, and ``apply_pruning`` → ``generate`` → ``handle.remove()`` happens
  entirely inside it (``remove`` in a ``finally``), so no request ever sees another request's hooks
  — the unpruned answer included, which must not run while hooks are attached. A model copy per
  mode would double the memory and still need a lock for the pruned copy (two requests may ask for
  different methods). Gradio's queue runs one request at a time too (``concurrency_limit=1``) so
  waiting users see their place in the queue; the lock is what guarantees isolation, also for
  callers of :meth:`DemoEngine.compare` outside Gradio. Timings are therefore never disturbed by a
  concurrent request.
* **Network: none.** Gradio analytics are off, there is no share link, server-side rendering
  (Node) is off and the theme uses system fonts, so the page renders on an offline machine.
  The server binds 127.0.0.1 unless ``--host`` says otherwise.
* **Input checks** (:func:`load_image`, :func:`check_image_size`): files over 10 MB, images over
  20 megapixels, images more than 20 times wider than tall (or taller than wide), images the
  model's processor would enlarge past 20 megapixels (:func:`expected_processed_size` computes
  that from the processor's resize settings, without resizing) and anything PIL cannot decode are
  refused with a message shown in the page (never a traceback). Sizes are checked from the file's
  header, before any pixel is decoded, and again before every processor call
  (:meth:`DemoEngine._inputs`). The launched demo also lowers PIL's decompression-bomb limit to
  20 megapixels for the whole process (:func:`harden_pil`), so no code path (Gradio's included)
  decodes a bigger image.
* **Heatmap**: kept indices (``handle.stats.stages[i].kept``, visual-token indices of the sample)
  are mapped onto the segment's token grid (``stats.segments[0][0].grid``, 24 × 24 for LLaVA-1.5)
  and drawn over the image the model saw (the processor's resized, centre-cropped pixels); kept
  patches are coloured by the stage's scores when the scorer has them. Without a grid from the
  adapter: the base-resolution view when the adapter names one (``Adapter.base_view_side``:
  LLaVA-NeXT/anyres, whose base-view tokens come first), other models the factorisation of the
  token count closest to the image's aspect ratio.
* **Architecture questions go to the adapter** (``vtoken.adapters.get_adapter``): whether budgets
  are token counts (``Adapter.fixed_token_count``), the image token, the prompt placeholder and the
  base view; the demo never tests model classes.

Modules (package ``vtoken.demos``, the folder ``demos/``): this one is the entry point (command
line, ``main``) and re-exports the public names of the others —

* :mod:`.uploads`: upload limits and :func:`load_image` (checks before decoding);
* :mod:`.processed_size`: the size a processor will resize an image to, without resizing;
* :mod:`.loading`: device, dtype, model and processor loading, the prompt;
* :mod:`.answers`: :class:`DemoEngine`, the unpruned and pruned answers under one lock;
* :mod:`.heatmap`: the image as the model saw it and the per-stage kept-patch tiles;
* :mod:`.page`: the Gradio page and its request callback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if __name__ == "__main__" and not __package__:
    # Run by path (python demos/app.py): run this file as the package module vtoken.demos.app, whose
    # siblings import as vtoken.demos.*; this folder leaves sys.path first, so none of its files is
    # importable under a bare name (see vtoken/_folder_guard.py).
    _here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if not (isinstance(p, str) and os.path.realpath(p or os.curdir) == _here)]
    from vtoken.demo import load_app

    sys.exit(load_app().main())

# the package's modules, after the environment defaults and the run-by-path hand-over
from .answers import DEFAULT_METHOD, Answer, Comparison, DemoEngine, adapter_of  # noqa: E402
from .heatmap import kept_masks, model_view, render_heatmap  # noqa: E402
from .loading import (  # noqa: E402
    DEFAULT_MODEL, RANDOM_MODEL, RANDOM_MODELS, build_prompt, build_random_model, load_model,
)
from .page import (  # noqa: E402  (_tolerant_preprocess: for the tests)
    CSS, EXAMPLES_DIR, HERE, _tolerant_preprocess, build_app, example_rows, handle_request, metrics_markdown, theme,
)
from .processed_size import ProcessedSize, expected_processed_size  # noqa: E402
from .uploads import (  # noqa: E402
    MAX_ASPECT, MAX_BYTES, MAX_PIXELS, MAX_PROCESSED_PIXELS, UPLOAD_HARD_LIMIT, DemoInputError, InvalidUpload,
    check_image_size, harden_pil, load_image,
)

__all__ = [
    "Answer", "CSS", "Comparison", "DEFAULT_METHOD", "DEFAULT_MODEL", "DemoEngine", "DemoInputError",
    "EXAMPLES_DIR", "HERE", "InvalidUpload", "MAX_ASPECT", "MAX_BYTES", "MAX_PIXELS", "MAX_PROCESSED_PIXELS",
    "ProcessedSize", "RANDOM_MODEL", "RANDOM_MODELS", "UPLOAD_HARD_LIMIT", "adapter_of", "build_app",
    "build_prompt", "build_random_model", "check_image_size", "example_rows", "expected_processed_size",
    "handle_request", "harden_pil", "kept_masks", "load_image", "load_model", "main", "metrics_markdown",
    "model_view", "parse_args", "render_heatmap", "theme",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vtoken demo", description="Side-by-side demo: unpruned vs pruned VLM answers.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name or local checkpoint folder (default {DEFAULT_MODEL}); "
                        f"{' / '.join(RANDOM_MODELS)} = random weights of the built-in shapes, for tests")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--no-method-check", action="store_true",
                   help="warm up with the default method only: skip trying every method once at start "
                        "(methods this model cannot run then stay in the list and fail with a message)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up answers at start entirely")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    harden_pil()
    engine = DemoEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                        max_new_tokens=args.max_new_tokens)
    if not args.no_warmup:
        t0 = time.perf_counter()
        skipped = engine.warm_up(check_methods=not args.no_method_check)
        print(f"[vtoken demo] warmed up in {time.perf_counter() - t0:.1f} s"
              + (f"; methods this model cannot run: {', '.join(sorted(skipped))}" if skipped else ""), flush=True)
    demo = build_app(engine)
    demo.queue(default_concurrency_limit=1)
    print(f"[vtoken demo] model={args.model} device={engine.device} http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, ssr_mode=False,
                show_error=False, theme=theme(), css=CSS, allowed_paths=[str(EXAMPLES_DIR)],
                max_file_size=UPLOAD_HARD_LIMIT, quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
