"""``vtoken demo``: the Gradio side-by-side demo (unpruned vs pruned answers, kept-patch heatmap).

The demo itself lives in the repository's ``demos/`` folder (entry module ``demos/app.py``); this
module finds it — as the installed package ``vtoken.demos`` when the ``demos/`` folder is mapped
into the wheel, else beside this package in a source checkout, mapped to that name — and runs its
:func:`main`. Needs ``gradio`` (``pip install 'vtoken[demo]'``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def load_app():
    """The demo module (``demos/app.py``) as ``vtoken.demos.app``, with its sibling modules."""
    try:
        return importlib.import_module("vtoken.demos.app")
    except ModuleNotFoundError as exc:
        if exc.name not in ("vtoken.demos", "vtoken.demos.app"):
            raise
    folder = Path(__file__).resolve().parent.parent / "demos"
    if not (folder / "app.py").is_file():
        raise SystemExit(
            "vtoken demo: demos/app.py is not part of this installation; run it from a source checkout "
            "(python demos/app.py) or install vtoken with its demos"
        )
    _map_folder("vtoken.demos", folder)
    return importlib.import_module("vtoken.demos.app")


def _map_folder(name: str, folder: Path) -> None:
    """Import ``folder`` as the package ``name``, as the wheel's ``package-dir`` mapping does (a
    source checkout that is on ``sys.path`` but not installed), so its modules import each other."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    from vtoken._folder_guard import exec_as

    module = exec_as(name, spec)
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)


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
