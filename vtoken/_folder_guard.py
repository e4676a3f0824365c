"""Keeps the repository's mapped folders from standing in for other distributions.

``scorers/``, ``hooks/``, ``kernels/`` and ``demos/`` at the repository root install as
``vtoken.scorers``, ``vtoken.hooks``, ``vtoken.kernels`` and ``vtoken.demos`` (``package-dir`` in
``pyproject.toml``). With the repository root on ``sys.path`` (``python -m pytest``, ``python -m
vtoken.eval``, a notebook started there) a bare ``import kernels`` would find the folder before
Hugging Face's ``kernels`` distribution, which transformers >= 5.25 imports. So each of those
folders' ``__init__.py`` starts with::

    if "." not in __name__:  # imported under its bare folder name, not as vtoken.<name>
        ...load this file...hand_over(__name__, __file__)

:func:`hand_over` then gives the bare name to the module of that name found without the repository
root (another distribution), or to an empty module when there is none (what Python gives for a
folder that is not a package): none of the folder's code is ever importable under a name other than
``vtoken.<name>``.

This file is run by path (``runpy.run_path``), never imported through
``import vtoken``: importing the package here could import transformers, which imports
``kernels`` — the very name being resolved.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _same_dir(entry, root: str) -> bool:
    if not isinstance(entry, str):
        return False
    try:
        return os.path.realpath(entry or os.getcwd()) == root
    except (OSError, ValueError):
        return False


def _find_elsewhere(name: str, root: str):
    """The spec ``import name`` would find if ``root`` were not on ``sys.path`` (meta-path finders
    of other editable installs included), or None."""
    path = [entry for entry in sys.path if not _same_dir(entry, root)]
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec(name, path)
        elif hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, None)
        else:
            continue
        origin = getattr(spec, "origin", None) if spec is not None else None
        locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec is not None else []
        inside_root = any(_same_dir(os.path.dirname(p), root) for p in locations) or (
            isinstance(origin, str) and _same_dir(os.path.dirname(os.path.dirname(origin)), root)
        )
        if spec is not None and not inside_root:
            return spec
    return None


def hand_over(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (the repository folder being imported as ``name``) by the other
    distribution's module of that name, executed here, or by an empty namespace-like module (no
    ``__file__``, no submodules) when there is none.

    name:      the bare name the folder was imported under (``"kernels"``).
    init_file: that folder's ``__init__.py`` (its parent's parent is the repository root).

    The import system returns ``sys.modules[name]`` once the folder's ``__init__`` finishes, so the
    caller receives the other module.
    """
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(init_file))))
    spec = _find_elsewhere(name, root)
    if spec is None or spec.loader is None:
        # No other distribution: behave as Python does for a folder that is not a package (a PEP 420
        # namespace portion): an empty module with no __file__ and no submodules. transformers reads
        # exactly that as "not installed" (it imports a name whose metadata is missing).
        empty = importlib.machinery.ModuleSpec(name, None, is_package=True)
        empty.submodule_search_locations = []
        module = importlib.util.module_from_spec(empty)
        module.__doc__ = (f"Empty: the repository folder {os.path.join(root, name)} installs as "
                          f"'vtoken.{name}' and is not importable as a top-level {name!r}.")
        sys.modules[name] = module
        return
    exec_as(name, spec)


def exec_as(name: str, spec):
    """Create the module of ``spec``, register it as ``sys.modules[name]`` (so that its own imports
    of ``name`` find it) and execute it; on failure nothing stays registered. Returns the module."""
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
