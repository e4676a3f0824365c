"""Built-in methods: each registers a preset plan builder and its scorer class.

Defaults are the papers' defaults. ``keep`` is the per-image budget (int tokens or a fraction in
(0, 1]); for single-stage methods it is the number of visual tokens kept, for the progressive
ones (PyramidDrop, SparseVLM) each builder documents how ``keep`` maps onto its stages.

Every attention-ranked method (fastv, sparsevlm, pyramiddrop, fastervlm, visionzip, zipvl,
flowcut, rollout, var) also takes the modifiers ``debias=True`` (Attention Debiasing) and
``exclude_sinks=True`` (VAR-style sink exclusion); see :class:`vtoken.scorers.attention.AttentionScorer`.
"""

from __future__ import annotations

import numbers

from vtoken.errors import PruningConfigError
from vtoken.methods import MethodSpec, available_methods, method_spec, register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers.attention import (
    FasterVLMScorer,
    FastVScorer,
    PyramidDropScorer,
    SparseVLMScorer,
    VisionZipScorer,
    ZipVLScorer,
)
from vtoken.scorers.baselines import KeepAllScorer, RandomScorer, UniformScorer
from vtoken.scorers.diversity import AgileScorer, DARTScorer, DivPruneScorer
from vtoken.scorers.flow import FlowCutScorer, RolloutScorer
from vtoken.scorers.sink import VARScorer

for _cls in (
    FastVScorer, RandomScorer, UniformScorer, KeepAllScorer,
    SparseVLMScorer, PyramidDropScorer, FasterVLMScorer, VisionZipScorer, ZipVLScorer,
    DivPruneScorer, DARTScorer, AgileScorer, FlowCutScorer, RolloutScorer, VARScorer,
):
    register_scorer(_cls)

#: options every attention-ranked method accepts (AttentionScorer modifiers)
MODIFIERS = ("debias", "exclude_sinks", "debias_trend", "debias_padding", "empty_weight", "sink_tau")


def _layers(layers, what: str) -> tuple:
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = (layers,)
    try:
        out = tuple(int(x) for x in layers)
    except TypeError:
        raise PruningConfigError(f"{what} must be a sequence of layer indices; got {layers!r}") from None
    if not out:
        raise PruningConfigError(f"{what} must name at least one layer; got {layers!r}")
    return out


# ----------------------------------------------------------------------------- baselines + FastV


def _fastv(keep, K: int = 2, mode: str = "select", **modifiers):
    return [Stage(layer=K, scorer=FastVScorer(**modifiers), keep=validate_budget(keep), mode=mode)]


def _random(keep, layer: int = 0, seed: int = 0):
    return [Stage(layer=layer, scorer=RandomScorer(seed=seed), keep=validate_budget(keep))]


def _uniform(keep, layer: int = 0):
    return [Stage(layer=layer, scorer=UniformScorer(), keep=validate_budget(keep))]


def _none(keep=1.0, layer: int = 0):
    return [Stage(layer=layer, scorer=KeepAllScorer(), keep=1.0)]


# ----------------------------------------------------------------------------- SparseVLM

#: SparseVLM's released budget tables (LLaVA-1.5, 576 visual tokens): visual tokens kept after
#: each of its three pruning layers, for the nominal budgets 192 / 128 / 64 (the nominal budget
#: is the layer-averaged count, e.g. (2*576 + 4*300 + 10*200 + 16*110) / 32 = 191).
SPARSEVLM_TABLES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
SPARSEVLM_REFERENCE_TOKENS = 576


def sparsevlm_budgets(keep, budget: str = "equivalent") -> tuple:
    """Per-stage budgets of the SparseVLM preset for ``keep``.

    ``budget="equivalent"`` (default, the paper's convention): ``keep`` is the nominal,
    layer-averaged budget; the table of the nearest nominal budget (192 / 128 / 64, as a
    fraction of 576 for float budgets) is scaled by keep / nominal. So keep=64 gives the paper's
    (66, 30, 17) and keep=96 gives (227, 82, 27) (ties go to the larger table).
    ``budget="final"``: the table is scaled so that the LAST stage keeps exactly ``keep``.
    """
    keep = validate_budget(keep)
    if budget not in ("equivalent", "final"):
        raise PruningConfigError(f"sparsevlm budget must be 'equivalent' or 'final'; got {budget!r}")
    ref = SPARSEVLM_REFERENCE_TOKENS
    as_tokens = keep if isinstance(keep, int) else keep * ref
    if budget == "equivalent":
        nominal = min(SPARSEVLM_TABLES, key=lambda k: (abs(k - as_tokens), -k))
        factor = as_tokens / nominal
    else:
        nominal = min(SPARSEVLM_TABLES, key=lambda k: (abs(SPARSEVLM_TABLES[k][-1] - as_tokens), -k))
        factor = as_tokens / SPARSEVLM_TABLES[nominal][-1]
    raw = [x * factor for x in SPARSEVLM_TABLES[nominal]]
    if isinstance(keep, int):
        out = [max(1, int(round(x))) for x in raw]
        if budget == "final":
            out[-1] = keep
    else:
        out = [min(1.0, max(1e-6, x / ref)) for x in raw]
        if budget == "final":
            out[-1] = keep
    for i in range(1, len(out)):  # never grow from stage to stage
        out[i] = min(out[i], out[i - 1])
    return tuple(out)


def _sparsevlm(keep, layers=(2, 6, 15), recycle: bool = False, budget: str = "equivalent", mode=None,
               recycle_ratio: float = 0.3, cluster_ratio: float = 0.1, **modifiers):
    """SparseVLM preset: stages at ``layers`` (the paper's pruning layers 2, 6, 15) with the
    budgets of :func:`sparsevlm_budgets`; ``recycle=True`` runs the stages in merge mode.

    The official code scores with the attention OF layer l and drops tokens from its output
    (entering l+1); vtoken's stage at layer L scores with layer L-1's attention and prunes the
    input of layer L, so ``layers=(3, 7, 16)`` reproduces the code's placement exactly, while
    the default keeps the paper's numbers.
    """
    layers = _layers(layers, "sparsevlm layers")
    budgets = sparsevlm_budgets(keep, budget)
    if len(layers) != len(budgets):
        raise PruningConfigError(f"sparsevlm has {len(budgets)} stages; got layers={layers}")
    mode = mode or ("merge" if recycle else "select")
    scorer = SparseVLMScorer(recycle=recycle, recycle_ratio=recycle_ratio, cluster_ratio=cluster_ratio, **modifiers)
    return [Stage(layer=L, scorer=scorer, keep=b, mode=mode) for L, b in zip(layers, budgets)]


# ----------------------------------------------------------------------------- PyramidDrop


def pyramiddrop_budgets(keep, stages: int = 3, lam: float = 0.5) -> tuple:
    """Per-stage budgets of the PyramidDrop preset: each stage keeps ``lam`` of the previous
    one and the LAST stage keeps exactly ``keep``: keep / lam**(stages-1), ..., keep / lam, keep.

    With lam = 0.5: keep=72 of 576 gives the paper's 288 / 144 / 72 (its 50% / 25% / 12.5%);
    keep=64 gives 256 / 128 / 64; a float keep=0.125 gives 0.5 / 0.25 / 0.125. A stage whose
    budget exceeds an image's tokens keeps the image whole (so the first halvings may be no-ops
    for small images).
    """
    keep = validate_budget(keep)
    if not 0.0 < lam <= 1.0:
        raise PruningConfigError(f"pyramiddrop lam must lie in (0, 1]; got {lam}")
    out = []
    for i in range(stages):
        x = keep / lam ** (stages - 1 - i)
        out.append(max(1, int(round(x))) if isinstance(keep, int) else min(1.0, x))
    return tuple(out)


def _pyramiddrop(keep, layers=(8, 16, 24), lam: float = 0.5, mode: str = "select", **modifiers):
    layers = _layers(layers, "pyramiddrop layers")
    scorer = PyramidDropScorer(**modifiers)
    return [Stage(layer=L, scorer=scorer, keep=b, mode=mode)
            for L, b in zip(layers, pyramiddrop_budgets(keep, len(layers), lam))]


# ----------------------------------------------------------------------------- pre-LLM attention


def _fastervlm(keep, vision_layers=None, mode: str = "select", **modifiers):
    options = {} if vision_layers is None else {"vision_layers": _layers(vision_layers, "fastervlm vision_layers")}
    return [Stage(layer=0, scorer=FasterVLMScorer(**modifiers), keep=validate_budget(keep), mode=mode, options=options)]


def _visionzip(keep, dominant=None, contextual=None, contextual_ratio: float = 10.0 / 64.0, **modifiers):
    if (dominant is None) != (contextual is None):
        raise PruningConfigError("visionzip: give both dominant= and contextual= (e.g. 54 and 10), or neither")
    if dominant is not None:
        if int(dominant) < 1 or int(contextual) < 0:
            raise PruningConfigError(f"visionzip: need dominant >= 1 and contextual >= 0; got {dominant}, {contextual}")
        keep = int(dominant) + int(contextual)
        contextual_ratio = int(contextual) / keep
    scorer = VisionZipScorer(contextual_ratio=contextual_ratio, **modifiers)
    return [Stage(layer=0, scorer=scorer, keep=validate_budget(keep), mode="merge")]


# ----------------------------------------------------------------------------- adaptive / diversity / flow / sink


def _zipvl(keep=1.0, K: int = 2, threshold: float = 0.975, mode: str = "select", **modifiers):
    return [Stage(layer=K, scorer=ZipVLScorer(threshold=threshold, **modifiers), keep=validate_budget(keep), mode=mode)]


def _divprune(keep, layer: int = 0, mode: str = "select"):
    return [Stage(layer=layer, scorer=DivPruneScorer(), keep=validate_budget(keep), mode=mode)]


def _dart(keep, K: int = 2, pivot_image: int = 4, pivot_text: int = 4, key_norm: int = 2, mode: str = "select"):
    scorer = DARTScorer(pivot_image=pivot_image, pivot_text=pivot_text, key_norm=key_norm)
    return [Stage(layer=K, scorer=scorer, keep=validate_budget(keep), mode=mode)]


def _agile(keep, K: int = 2, min_attention_share: float = 0.0, max_attention_share: float = 1.0, mode: str = "select"):
    scorer = AgileScorer(min_attention_share=min_attention_share, max_attention_share=max_attention_share)
    return [Stage(layer=K, scorer=scorer, keep=validate_budget(keep), mode=mode)]


def _flowcut(keep, K: int = 2, relay=True, momentum: float = 0.5, mode: str = "select", **modifiers):
    scorer = FlowCutScorer(relay=relay, momentum=momentum, **modifiers)
    return [Stage(layer=K, scorer=scorer, keep=validate_budget(keep), mode=mode)]


def _rollout(keep, K: int = 2, residual: float = 0.5, mode: str = "select", **modifiers):
    return [Stage(layer=K, scorer=RolloutScorer(residual=residual, **modifiers), keep=validate_budget(keep), mode=mode)]


def _var(keep, K: int = 2, tau: float = 20.0, rho: float = 0.5, summ: float = 0.2, p: float = 0.6, dims=None,
         num_dims: int = 2, keep_sinks: bool = False, mode: str = "select", **modifiers):
    scorer = VARScorer(tau=tau, rho=rho, summ=summ, p=p, dims=dims, num_dims=num_dims, keep_sinks=keep_sinks,
                       **modifiers)
    return [Stage(layer=K, scorer=scorer, keep=validate_budget(keep), mode=mode)]


# ----------------------------------------------------------------------------- registry

_M = MODIFIERS
register_method(MethodSpec("fastv", "attention", _fastv, paper="Chen et al., ECCV 2024 (arXiv:2403.06764)",
                           stages="layer K=2", needs_attention=True, text_guided=True, options=("K", "mode") + _M))
register_method(MethodSpec("sparsevlm", "attention", _sparsevlm, paper="Zhang et al., ICML 2025 (arXiv:2410.04417)",
                           stages="layers 2, 6, 15", needs_attention=True, text_guided=True,
                           options=("layers", "recycle", "budget", "mode", "recycle_ratio", "cluster_ratio") + _M))
register_method(MethodSpec("pyramiddrop", "attention", _pyramiddrop, paper="Xing et al., CVPR 2025 (arXiv:2410.17247)",
                           stages="layers 8, 16, 24", needs_attention=True, text_guided=True,
                           options=("layers", "lam", "mode") + _M))
register_method(MethodSpec("fastervlm", "attention", _fastervlm,
                           paper="Zhang et al. 2024 (arXiv:2412.01818); VTC-CLS (arXiv:2412.05819)",
                           stages="layer 0 (before the LLM)", needs_attention=False, text_guided=False,
                           options=("vision_layers", "mode") + _M))
register_method(MethodSpec("visionzip", "attention", _visionzip, paper="Yang et al., CVPR 2025 (arXiv:2412.04467)",
                           stages="layer 0 (before the LLM), merge", needs_attention=False, text_guided=False,
                           options=("dominant", "contextual", "contextual_ratio") + _M))
register_method(MethodSpec("zipvl", "attention", _zipvl, paper="He et al. 2024 (arXiv:2410.08584)",
                           stages="layer K=2, adaptive count", needs_attention=True, text_guided=True,
                           options=("K", "threshold", "mode") + _M))
register_method(MethodSpec("divprune", "diversity", _divprune, paper="Alvar et al., CVPR 2025 (arXiv:2503.02175)",
                           stages="layer 0 (before the LLM)", needs_attention=False, text_guided=False,
                           options=("layer", "mode")))
register_method(MethodSpec("dart", "diversity", _dart, paper="Wen et al. 2025 (arXiv:2502.11494)",
                           stages="layer K=2", needs_attention=False, text_guided=True,
                           options=("K", "pivot_image", "pivot_text", "key_norm", "mode")))
register_method(MethodSpec("agile", "diversity", _agile, paper="Baek et al., ICLR 2026 (arXiv:2603.01236)",
                           stages="layer K=2", needs_attention=True, text_guided=True,
                           options=("K", "min_attention_share", "max_attention_share", "mode")))
register_method(MethodSpec("flowcut", "flow", _flowcut, paper="Tong et al. 2025 (arXiv:2505.19536)",
                           stages="layer K=2", needs_attention=True, text_guided=True,
                           options=("K", "relay", "momentum", "mode") + _M))
register_method(MethodSpec("rollout", "flow", _rollout, paper="Abnar & Zuidema, ACL 2020 (arXiv:2005.00928)",
                           stages="layer K=2", needs_attention=True, text_guided=True,
                           options=("K", "residual", "mode") + _M))
register_method(MethodSpec("var", "sink", _var, paper="Kang et al., ICLR 2025 (arXiv:2503.03321)",
                           stages="layer K=2", needs_attention=True, text_guided=True,
                           options=("K", "tau", "rho", "summ", "p", "dims", "num_dims", "keep_sinks", "mode") + _M))
register_method(MethodSpec("random", "baseline", _random, stages="layer 0", options=("layer", "seed")))
register_method(MethodSpec("uniform", "baseline", _uniform, stages="layer 0", options=("layer",)))
register_method(MethodSpec("none", "baseline", _none, stages="-", options=("layer",)))


# ----------------------------------------------------------------------------- methods table

_ROWS = {
    "attn_last": "last token",
    "attn_last_text": "last token",
    "attn_text": "text rows",
    "layer_attn_last": "last token, layers 0..K-1",
    "layer_attn_full": "full matrices, layers 0..K-1",
}
_FAMILY_ORDER = ("attention", "diversity", "flow", "sink", "baseline")


def _attention_column(spec) -> str:
    try:
        plan = spec.builder(64)
    except Exception:  # pragma: no cover - a builder that needs options
        return "yes" if spec.needs_attention else "no"
    needs = set()
    for st in plan:
        needs |= set(getattr(st.scorer, "needs", ())) | set(getattr(st.scorer, "optional_needs", ()))
    rows = sorted({_ROWS[n] for n in needs if n in _ROWS})
    parts = []
    if rows:
        parts.append("yes (" + "; ".join(rows) + ")")
    if "vision_attn" in needs:
        parts.append("vision-encoder [CLS] attention")
    return ", ".join(parts) if parts else "no"


def methods_table_markdown() -> str:
    """The README's methods table, rendered from the registry's MethodSpec entries:
    name | family | stage(s) | needs attention rows? | text-guided? | paper."""
    lines = [
        "| Method | Family | Stage(s) | Needs attention rows? | Text-guided? | Paper |",
        "|---|---|---|---|---|---|",
    ]

    def order(spec):
        family = _FAMILY_ORDER.index(spec.family) if spec.family in _FAMILY_ORDER else len(_FAMILY_ORDER)
        return family, spec.name

    specs = sorted((method_spec(name) for name in available_methods()), key=order)
    for spec in specs:
        lines.append(
            f"| `{spec.name}` | {spec.family} | {spec.stages or '-'} | {_attention_column(spec)} | "
            f"{'yes' if spec.text_guided else 'no'} | {spec.paper or '-'} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["methods_table_markdown", "sparsevlm_budgets", "pyramiddrop_budgets", "SPARSEVLM_TABLES", "MODIFIERS"]
