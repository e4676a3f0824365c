"""``vtoken demo``: the Gradio side-by-side demo (unpruned vs pruned answers, kept-patch heatmap).

The demo itself lives in the repository's ``demos/app.py``; this module finds it — as the
installed package ``vtoken.demos`` when the ``demos/`` folder is mapped into the wheel, else
beside this package in a source checkout — and runs its :func:`main`. Needs ``gradio``
(``pip install 'vtoken[demo]'``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def load_app():
    """The demo module (``demos/app.py``)."""
    try:
        return importlib.import_module("vtoken.demos.app")
    except ModuleNotFoundError as exc:
        if exc.name not in ("vtoken.demos", "vtoken.demos.app"):
            raise
    path = Path(__file__).resolve().parent.parent / "demos" / "app.py"
    if not path.is_file():
        raise SystemExit(
            "vtoken demo: demos/app.py is not part of this installation; run it from a source checkout "
            "(python demos/app.py) or install vtoken with its demos"
        )
    name = "vtoken_demos_app"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    """Run the demo; ``argv`` as for ``python demos/app.py`` (``--model``, ``--device``, ``--host``,
    ``--port``, ...)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("vtoken demo needs gradio: pip install 'vtoken[demo]' (or pip install gradio)") from None
    return load_app().main(argv)


if __name__ == "__main__":
    sys.exit(main())
