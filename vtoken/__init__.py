"""vtoken: visual-token pruning for Hugging Face vision-language models.

    from vtoken import apply_pruning
    handle = apply_pruning(model, method="fastv", keep=64)
    out = model.generate(**inputs)
    handle.remove()
"""

from vtoken.errors import (AlreadyPrunedError, PruningConfigError, UnsupportedCallError, UnsupportedModelError,
                           VTokenError)
from vtoken.methods import available_methods, build_plan
from vtoken.plan import DecodeStage, Stage
from vtoken.scorers.functional import erank

__version__ = "0.1.0"


def apply_pruning(model, method="fastv", keep=64, plan=None, compile=False, **options):
    """Attach visual-token pruning to ``model`` in place and return its handle.

    model:   a supported ``transformers`` VLM (see :func:`vtoken.adapters.supported_models`).
    method:  a name from :func:`available_methods`, case-insensitive (ignored when ``plan`` is
             given; ``handle.method`` is then None).
    keep:    int = visual tokens kept per image; float in (0, 1] = fraction of each image's tokens.
    plan:    an explicit list of :class:`Stage` (prefill) or of :class:`DecodeStage` (decode-time KV
             eviction / merging) instead of a method preset.
    options: method options (e.g. ``K=3`` for FastV); ``backend="auto"|"torch"|"triton"`` picks
             the attention-scoring implementation; ``vision_varlen=False`` keeps Qwen's vision tower
             as transformers runs it (by default its per-window attention runs as one varlen kernel
             launch a layer on CUDA, with its rotary embedding, and Qwen2.5-VL's norms and gate,
             fused where they check out, :func:`vtoken.kernels.patch_vision_varlen`; elsewhere, and
             with gradients, the tower's own forward runs). ``compile=True`` runs the model's own
             ``model.generate`` calls on the static decode engine (:class:`vtoken.engine.StaticDecoder`;
             greedy and sampling, :mod:`vtoken.engine.generate_route`); what it cannot carry (beams,
             ...) raises :class:`UnsupportedCallError`. Default False: ``generate`` as transformers runs it.
             ``compile={"fused_ops": True}`` (a dict of the engine's options: ``fused_ops``,
             ``merge_projections``, ``gemv``, ``cuda_graph``, ``graph_prefill``) routes the same way with
             those options set.

    Returns a :class:`vtoken.hooks.PruningHandle`: ``remove()``, context manager, ``stats``.
    """
    from vtoken.hooks.handle import attach

    engine = None if compile is False or compile is None else _engine_options(compile)
    handle = attach(model, method=method, keep=keep, plan=plan, **options)
    if engine is not None:
        from vtoken.engine.generate_route import route_generate

        try:
            route_generate(handle, backend=options.get("backend", "auto"), **engine)
        except Exception:
            handle.remove()
            raise
    return handle


def _engine_options(compile) -> dict:
    """``apply_pruning``'s ``compile`` argument (True or a dict of engine options) as engine options:
    the keyword-only options of :class:`vtoken.engine.StaticDecoder` other than ``backend`` (which
    ``apply_pruning`` passes itself)."""
    import inspect

    from vtoken.engine.static_decode import StaticDecoder

    allowed = tuple(n for n, p in inspect.signature(StaticDecoder.__init__).parameters.items()
                    if p.kind is p.KEYWORD_ONLY and n != "backend")
    if compile is True:
        return {}
    if isinstance(compile, dict) and set(compile) <= set(allowed):
        return dict(compile)
    raise PruningConfigError(f"compile must be False, True or a dict with keys among {allowed}, got {compile!r}")


__all__ = [
    "apply_pruning",
    "available_methods",
    "build_plan",
    "Stage",
    "DecodeStage",
    "erank",
    "VTokenError",
    "PruningConfigError",
    "UnsupportedModelError",
    "UnsupportedCallError",
    "AlreadyPrunedError",
]
