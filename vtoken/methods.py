"""The method registry: a method name is a preset plan (a list of :class:`vtoken.Stage`).

Methods register themselves with :func:`register_method` (see ``vtoken/scorers/catalog.py``);
:func:`build_plan` turns ``(method, keep, **options)`` into a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from vtoken.errors import PruningConfigError


@dataclass(frozen=True)
class MethodSpec:
    """name, family (attention / diversity / flow / sink / baseline), builder(keep, **options)
    -> list[Stage], the scorer classes it uses, and the paper it implements."""

    name: str
    family: str
    builder: Callable
    paper: str = ""
    stages: str = ""
    needs_attention: bool = False
    text_guided: bool = False
    options: tuple = field(default_factory=tuple)


_METHODS: dict = {}
_SCORERS: dict = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    _METHODS[spec.name] = spec
    return spec


def register_scorer(cls):
    """Class decorator / call: make a scorer constructible by name (``Stage(scorer="fastv")``)."""
    _SCORERS[cls.name] = cls
    return cls


def _load_catalog() -> None:
    if not _METHODS:
        import vtoken.scorers.catalog  # noqa: F401  (registers the built-in methods)


def available_methods() -> list:
    """Sorted names of every registered method."""
    _load_catalog()
    return sorted(_METHODS)


def method_spec(name: str) -> MethodSpec:
    _load_catalog()
    if not isinstance(name, str) or name.lower() not in _METHODS:
        raise PruningConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name.lower()]


def make_scorer(name: str, **options):
    _load_catalog()
    if name not in _SCORERS:
        raise PruningConfigError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(_SCORERS))}")
    return _SCORERS[name](**options)


def build_plan(method: str, keep, **options) -> list:
    """The preset plan of ``method`` for budget ``keep``; unknown options raise."""
    spec = method_spec(method)
    try:
        return spec.builder(keep, **options)
    except TypeError as exc:  # unexpected keyword
        raise PruningConfigError(
            f"bad option for method {spec.name!r}: {exc}; options it takes: {', '.join(spec.options) or 'none'}"
        ) from exc


def depth_scaled_options(method: str, num_layers: int, reference_depth: int = 32) -> dict:
    """``{"layers": ...}`` for a multi-stage preset whose default stage layers (the papers', for
    32-layer LLMs) do not fit a model with ``num_layers`` decoder layers: each layer L becomes
    ``round(L * num_layers / reference_depth)``, at least 1, strictly increasing, below
    ``num_layers``. ``{}`` when the defaults fit, or the method has no ``layers`` option, or the
    model is too shallow for its stage count. Used by ``vtoken eval`` (and noted in its table);
    :func:`vtoken.apply_pruning` itself never moves stages silently.
    """
    import inspect

    spec = method_spec(method)
    param = inspect.signature(spec.builder).parameters.get("layers")
    if param is None or not isinstance(param.default, tuple):
        return {}
    layers = param.default
    if max(layers) < num_layers:
        return {}
    scaled, prev = [], 0
    for L in layers:
        prev = max(prev + 1, round(L * num_layers / reference_depth), 1)
        scaled.append(prev)
    return {"layers": tuple(scaled)} if scaled[-1] < num_layers else {}
