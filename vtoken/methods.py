"""The method registry: a method name is a preset plan (a list of :class:`vtoken.Stage`).

Every method registers beside its scorer: the scorer's module defines the preset plan builder
right after the scorer class and decorates it with :func:`register_method` (the built-ins live in
``vtoken.scorers.attention``, ``.visionzip``, ``.sparsevlm``, ``.baselines``, ``.diversity``, ``.flow``
and ``.sink``)::

    @register_scorer
    class MyScorer(Scorer):
        name = "mine"
        ...

    @register_method(name="mine", family="attention", paper="Doe et al. 2025 (arXiv:...)",
                     stages="layer K=2", needs_attention=True, text_guided=True)
    def mine_plan(keep, K: int = 2, mode: str = "select"):
        return [Stage(layer=K, scorer=MyScorer(), keep=validate_budget(keep), mode=mode)]

:func:`build_plan` turns ``(method, keep, **options)`` into a plan.

Rules of the registry:

* Names are normalised once, by :func:`normalize_name` (surrounding blanks stripped, then
  ``str.casefold``), for registration and lookup alike: ``"FastV"`` and ``" fastv "`` name the
  same method, and :attr:`MethodSpec.name` holds the normalised name.
* A name registers once. A second registration under the same (normalised) name raises
  :class:`vtoken.errors.DuplicateRegistrationError` naming the existing registration, built-ins
  included; ``override=True`` replaces the existing entry on purpose (e.g. a patched variant of a
  built-in for an experiment). Registering the identical spec again is a no-op.
  :func:`unregister_method` removes an entry.
* The built-in methods are always registered before any lookup, and before a user registration
  is checked for duplicates: the registry imports the built-in scorer modules lazily (first use)
  but unconditionally, however many user methods exist by then. A registration made by a
  built-in module while it is being imported never triggers that import again (no cycles).
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import threading
from dataclasses import dataclass, field, replace
from typing import Callable

from vtoken.errors import DuplicateRegistrationError, PruningConfigError


@dataclass(frozen=True)
class MethodSpec:
    """name, family (attention / diversity / flow / sink / baseline, or any string for user
    methods), builder(keep, **options) -> list[Stage], the paper it implements, a one-line
    description of its stages, whether it reads LLM attention rows / the text prompt, the
    option names it takes (shown when an unknown option is passed), and ``released_code``: the
    authors' repository (``owner/name@commit`` where recorded) whose selection code a fidelity
    test holds the method's kept sets against ("" = not checked)."""

    name: str
    family: str
    builder: Callable
    paper: str = ""
    stages: str = ""
    needs_attention: bool = False
    text_guided: bool = False
    options: tuple = field(default_factory=tuple)
    released_code: str = ""


_METHODS: dict = {}
_SCORERS: dict = {}

#: the modules that define (and register) the built-in scorers and methods
_BUILTIN_MODULES = (
    "vtoken.scorers.attention",
    "vtoken.scorers.visionzip",
    "vtoken.scorers.sparsevlm",
    "vtoken.scorers.baselines",
    "vtoken.scorers.diversity",
    "vtoken.scorers.flow",
    "vtoken.scorers.sink",
    "vtoken.scorers.scope",
    "vtoken.scorers.cdpruner",
    "vtoken.scorers.vispruner",
    "vtoken.scorers.prunesid",
    "vtoken.scorers.dycoke",
    "vtoken.scorers.fastvid",
    "vtoken.scorers.adaptinfer",
    "vtoken.scorers.mustdrop",
    "vtoken.scorers.vscan",
    "vtoken.scorers.holitom",
    "vtoken.scorers.flashvid",
    "vtoken.scorers.decode",
    "vtoken.scorers.learned",
)
_builtins_loaded = False
_LOCK = threading.Lock()  # check-and-insert of one registration (never held across an import)


def normalize_name(name, what: str = "method name") -> str:
    """The registry key of ``name``: surrounding blanks stripped, then casefolded. The one
    normalisation both registration and lookup use."""
    if not isinstance(name, str):
        raise PruningConfigError(f"{what} must be a string; got {type(name).__name__} {name!r}")
    key = name.strip().casefold()
    if not key:
        raise PruningConfigError(f"{what} must not be empty; got {name!r}")
    return key


def _ensure_builtins() -> None:
    """Import the built-in scorer modules (which register their scorers and methods) once.

    Unconditional: user registrations do not stand in for the built-ins. A module found half
    imported (an import cycle: it is executing right now, its later registrations still to come)
    leaves the registry marked "not loaded", so the next lookup checks again.
    """
    global _builtins_loaded
    if _builtins_loaded:
        return
    complete = True
    for name in _BUILTIN_MODULES:
        module = importlib.import_module(name)
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            complete = False
    _builtins_loaded = complete


def _is_builtin(obj) -> bool:
    return getattr(obj, "__module__", None) in _BUILTIN_MODULES


def _describe(spec: MethodSpec) -> str:
    b = spec.builder
    where = f"{getattr(b, '__module__', '?')}.{getattr(b, '__qualname__', repr(b))}"
    return f"{where} (family {spec.family!r})"


def _options_of(builder) -> tuple:
    """Named options of a builder ``(keep, opt1=..., opt2=..., **more)``: its parameters after
    ``keep`` (``**`` catch-alls are not listed)."""
    try:
        params = list(inspect.signature(builder).parameters.values())[1:]
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _register(spec: MethodSpec, override: bool) -> MethodSpec:
    key = normalize_name(spec.name)
    if not callable(spec.builder):
        raise PruningConfigError(f"method {key!r}: builder must be callable; got {spec.builder!r}")
    if spec.name != key:
        spec = replace(spec, name=key)
    if not _is_builtin(spec.builder):
        _ensure_builtins()  # a user name is checked against the built-ins, always
    with _LOCK:
        existing = _METHODS.get(key)
        if existing is not None and existing != spec and not override:
            raise DuplicateRegistrationError(
                f"method {key!r} is already registered by {_describe(existing)}; register under another "
                f"name, or pass override=True to replace it"
            )
        _METHODS[key] = spec
    return spec


def register_method(spec=None, /, *, name=None, family: str = "custom", paper: str = "", stages: str = "",
                    needs_attention: bool = False, text_guided: bool = False, options=None, builder=None,
                    override: bool = False, released_code: str = ""):
    """Register a preset plan builder ``builder(keep, **options) -> list[Stage]`` under ``name``.

    As a decorator on the builder (the builder is returned unchanged)::

        @register_method(name="mine", family="attention", paper="...", stages="layer K=2")
        def mine_plan(keep, K=2): ...

    ``@register_method`` without arguments registers under the function's name. A ready
    :class:`MethodSpec` registers with ``register_method(spec)`` (returns the stored spec), a
    builder directly with ``register_method(builder=fn, name=...)`` (returns ``fn``).

    ``options`` (names shown when an unknown option is passed) default to the builder's named
    parameters after ``keep``. ``name`` is normalised by :func:`normalize_name`. A name that is
    already registered raises :class:`~vtoken.errors.DuplicateRegistrationError`, unless
    ``override=True``, which replaces the existing entry (built-ins included).
    """
    if isinstance(spec, MethodSpec):
        if name is not None or builder is not None:
            raise PruningConfigError("register_method(spec): give either a MethodSpec or name=/builder=, not both")
        return _register(spec, override)
    if spec is not None:  # bare @register_method, or register_method(fn, name=...)
        if builder is not None:
            raise PruningConfigError("register_method: builder given twice")
        builder = spec

    def decorate(fn):
        opts = _options_of(fn) if options is None else tuple(options)
        _register(MethodSpec(name=fn.__name__ if name is None else name, family=family, builder=fn, paper=paper,
                             stages=stages, needs_attention=needs_attention, text_guided=text_guided,
                             options=opts, released_code=released_code), override)
        return fn

    return decorate if builder is None else decorate(builder)


def unregister_method(name: str) -> MethodSpec:
    """Remove the method ``name`` from the registry and return its spec (re-register it with
    ``register_method(spec, override=True)``)."""
    _ensure_builtins()
    key = normalize_name(name)
    with _LOCK:
        spec = _METHODS.pop(key, None)
    if spec is None:
        raise PruningConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return spec


def register_scorer(cls=None, /, *, override: bool = False):
    """Class decorator (or call): make a scorer constructible by its ``name``
    (``Stage(scorer="fastv")``). Same rules as :func:`register_method`: the name is normalised,
    and another class under a registered name raises unless ``override=True``."""

    def decorate(klass):
        key = normalize_name(getattr(klass, "name", None), what="scorer name")
        if not _is_builtin(klass):
            _ensure_builtins()
        with _LOCK:
            existing = _SCORERS.get(key)
            if existing is not None and existing is not klass and not override:
                raise DuplicateRegistrationError(
                    f"scorer {key!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
                    "use another name, or pass override=True to replace it"
                )
            _SCORERS[key] = klass
        return klass

    return decorate if cls is None else decorate(cls)


def _lookup(table: dict, name):
    try:
        return table.get(normalize_name(name))
    except PruningConfigError:  # not a string, or blank: unknown
        return None


def available_methods() -> list:
    """Sorted names of every registered method."""
    _ensure_builtins()
    return sorted(_METHODS)


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered under ``name`` (normalised by :func:`normalize_name`)."""
    _ensure_builtins()
    spec = _lookup(_METHODS, name)
    if spec is None:
        raise PruningConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return spec


def make_scorer(name: str, **options):
    """A new instance of the scorer registered under ``name``."""
    _ensure_builtins()
    cls = _lookup(_SCORERS, name)
    if cls is None:
        raise PruningConfigError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(_SCORERS))}")
    return cls(**options)


def build_plan(method: str, keep, **options) -> list:
    """The preset plan of ``method`` for budget ``keep``; unknown options raise."""
    spec = method_spec(method)
    try:
        return spec.builder(keep, **options)
    except TypeError as exc:  # unexpected keyword
        raise PruningConfigError(
            f"bad option for method {spec.name!r}: {exc}; options it takes: {', '.join(spec.options) or 'none'}"
        ) from exc


def with_model_depth(method: str, options: dict, num_layers: int, checkpoint=None) -> dict:
    """``options`` plus what the model tells a preset whose builder takes it and was not given it:
    ``num_layers`` (the model's decoder-layer count; e.g. per-layer ZipVL: a stage at every layer
    from K on) and ``checkpoint`` (the model's checkpoint folder, where learned methods find their
    weights; see :mod:`vtoken.scorers.learned`). ``options`` unchanged otherwise.
    :func:`vtoken.apply_pruning` calls it."""
    try:
        params = inspect.signature(method_spec(method).builder).parameters
    except (TypeError, ValueError):
        return options
    known = {"num_layers": int(num_layers), "checkpoint": checkpoint}
    extra = {k: v for k, v in known.items() if k in params and k not in options}
    return {**options, **extra} if extra else options


def layer_indices(layers, what: str) -> tuple:
    """``layers`` (an int or a sequence of ints) as a non-empty tuple of ints, for preset
    builders' ``layers=`` options; anything else raises :class:`PruningConfigError`."""
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = (layers,)
    try:
        out = tuple(int(x) for x in layers)
    except TypeError:
        raise PruningConfigError(f"{what} must be a sequence of layer indices; got {layers!r}") from None
    if not out:
        raise PruningConfigError(f"{what} must name at least one layer; got {layers!r}")
    return out


def depth_scaled_options(method: str, num_layers: int, reference_depth: int = 32) -> dict:
    """``{"layers": ...}`` for a multi-stage preset whose default stage layers (the papers', for
    32-layer LLMs) do not fit a model with ``num_layers`` decoder layers: each layer L becomes
    ``round(L * num_layers / reference_depth)``, at least 1, strictly increasing, below
    ``num_layers``. ``{}`` when the defaults fit, or the method has no ``layers`` option, or the
    model is too shallow for its stage count. Used by ``vtoken eval`` (and noted in its table);
    :func:`vtoken.apply_pruning` itself never moves stages silently.
    """
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


def budget_count_options(method: str, count: str) -> dict:
    """``{"budget": count}`` for a preset whose budget can be counted two ways (SparseVLM's
    ``budget="equivalent" | "final"``), so that a table whose "Retain N" blocks count ``count``
    tokens ("final": visual tokens left after the last stage; "equivalent": layer-averaged, docs/DESIGN.md
    section 4) runs the method at N by that count; ``{}`` for a preset with no such option (its
    ``keep`` is already the final count). Used by ``vtoken eval``."""
    from vtoken.plan import BUDGET_COUNTS

    if count not in BUDGET_COUNTS:
        raise PruningConfigError(f"budget count must be 'final' or 'equivalent'; got {count!r}")
    param = inspect.signature(method_spec(method).builder).parameters.get("budget")
    return {"budget": count} if param is not None else {}

