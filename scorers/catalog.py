"""The method catalogue as a whole: the README's methods table and re-exports of the presets' shared
pieces. It registers nothing itself.

Each built-in method is registered beside its scorer, in the scorer's module
(:mod:`vtoken.scorers.attention`, :mod:`~vtoken.scorers.visionzip`, :mod:`~vtoken.scorers.sparsevlm`,
:mod:`~vtoken.scorers.baselines`, :mod:`~vtoken.scorers.diversity`, :mod:`~vtoken.scorers.flow`,
:mod:`~vtoken.scorers.sink`, :mod:`~vtoken.scorers.scope`, :mod:`~vtoken.scorers.cdpruner`,
:mod:`~vtoken.scorers.vispruner`, :mod:`~vtoken.scorers.dycoke`, :mod:`~vtoken.scorers.fastvid`,
:mod:`~vtoken.scorers.adaptinfer`, :mod:`~vtoken.scorers.mustdrop`, :mod:`~vtoken.scorers.learned`): a
plan builder decorated with :func:`vtoken.methods.register_method` right after the scorer class. The registry
(:mod:`vtoken.methods`) imports those modules before any lookup.

Defaults are the papers' defaults. ``keep`` is the per-image budget (int tokens or a fraction in
(0, 1]); for single-stage methods it is the number of visual tokens kept, for the progressive
ones (PyramidDrop, SparseVLM, AdaptInfer) each builder documents how ``keep`` maps onto its stages; for
the adaptive ones (ZipVL, MustDrop) ``keep`` caps each stage's count (1.0: no cap).

Every attention-ranked method (fastv, sparsevlm, pyramiddrop, fastervlm, visionzip, zipvl,
flowcut, rollout, attnflow, var) also takes the modifiers ``debias=True`` (Attention Debiasing) and
``exclude_sinks=True`` (sink exclusion, with ``sink_rule="var"|"act"|"secondary"``); see
:class:`vtoken.scorers.attention_base.AttentionScorer`.
"""

from __future__ import annotations

from vtoken.methods import MethodSpec, available_methods, method_spec, register_method, register_scorer  # noqa: F401
from vtoken.plan import Stage, validate_budget  # noqa: F401
from vtoken.scorers.attention import pyramiddrop_budgets  # noqa: F401
from vtoken.scorers.attention_base import MODIFIERS  # noqa: F401
from vtoken.scorers.sparsevlm import SPARSEVLM_REFERENCE_TOKENS, SPARSEVLM_TABLES, sparsevlm_budgets  # noqa: F401
from vtoken.signals import SIGNALS


# ----------------------------------------------------------------------------- methods table

#: how the methods table names the attention captures a signal takes (vtoken.signals.SIGNALS)
_CAPTURE_LABELS = {"last": "last token", "text": "text rows", "full": "full matrices"}
_FAMILY_ORDER = ("attention", "diversity", "flow", "sink", "learned", "decode", "baseline")


def _attention_column(spec) -> str:
    try:
        scorers = [st.scorer for st in spec.builder(64)]
    except Exception:  # a builder that needs options or weights (learned): its scorer class by name
        from vtoken.methods import _SCORERS

        cls = _SCORERS.get(spec.name)
        if cls is None:  # pragma: no cover
            return "yes" if spec.needs_attention else "no"
        scorers = [cls]
    needs = set()
    for sc in scorers:
        needs |= set(getattr(sc, "needs", ())) | set(getattr(sc, "optional_needs", ()))
    rows, vision = set(), False
    if any(getattr(sc, "reads_attention", False) for sc in scorers):  # decode-time scorers
        rows.add("every query row, prefill and decode steps, accumulated")
    if any(getattr(sc, "reads_query", False) for sc in scorers):  # LazyLLM: q . k of the last query
        rows.add("last token's query at each stage, over kept and stashed keys")
    for signal in (SIGNALS[n] for n in needs if n in SIGNALS):
        vision |= signal.vision and signal.name.endswith("attn")
        for capture in signal.probe:
            if capture in _CAPTURE_LABELS:
                rows.add(_CAPTURE_LABELS[capture] + (", layers 0..K-1" if signal.every_layer else ""))
    parts = []
    if rows:
        parts.append("yes (" + "; ".join(sorted(rows)) + ")")
    if vision:
        parts.append("vision-encoder [CLS] attention")
    return ", ".join(parts) if parts else "no"


def methods_table_markdown() -> str:
    """The README's methods table, rendered from the registry's MethodSpec entries:
    name | family | stage(s) | needs attention rows? | text-guided? | paper | checked against
    released code (``MethodSpec.released_code``: the authors' repository whose selection code a
    fidelity test holds the kept sets against, ``@commit`` where recorded)."""
    lines = [
        "| Method | Family | Stage(s) | Needs attention rows? | Text-guided? | Paper | Checked against released code |",
        "|---|---|---|---|---|---|---|",
    ]

    def order(spec):
        family = _FAMILY_ORDER.index(spec.family) if spec.family in _FAMILY_ORDER else len(_FAMILY_ORDER)
        return family, spec.name

    specs = sorted((method_spec(name) for name in available_methods()), key=order)
    for spec in specs:
        lines.append(
            f"| `{spec.name}` | {spec.family} | {spec.stages or '-'} | {_attention_column(spec)} | "
            f"{'yes' if spec.text_guided else 'no'} | {spec.paper or '-'} | {spec.released_code or '-'} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["methods_table_markdown", "sparsevlm_budgets", "pyramiddrop_budgets", "SPARSEVLM_TABLES", "MODIFIERS"]
