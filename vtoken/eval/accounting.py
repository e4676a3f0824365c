"""Token accounting of the report's rows (docs/DESIGN.md §4).

Every row shows the visual tokens it really keeps, measured per question from the pruning handle's
stats (recorded in ``predictions.jsonl``) and averaged over the questions — "Kept (final)" after the
last stage, "Equiv. (layer-avg)" = layer-averaged tokens, "Kept per stage" ``L<layer>:<tokens>`` —
never taken from a preset's budget tables. The table says which count its "Retain N" blocks use
(``EvalConfig.budget_count``: ``"final"``, the default, or ``"equivalent"``) and checks every row
against it (:func:`budget_check`): ``final`` = exactly N per image (``tokens_for``: an image smaller
than N keeps all; fractions round per image), ``equivalent`` = within :data:`EQUIV_TOLERANCE` of N. A
preset that can count its budget either way (SparseVLM: its paper's (66, 30, 17) at 64 is 17 final,
≈ 62 layer-averaged on a 32-layer LLM) is run by the table's count
(:func:`vtoken.methods.budget_count_options`). A row that still does not keep its block's budget
(e.g. FastV by layer-averaged tokens) is marked ⚠ in the table, with what it keeps, and listed in
``results.json`` (``budget_mismatches``).
"""

from __future__ import annotations

import statistics
from typing import Optional

from vtoken.eval.records import keep_key
from vtoken.plan import tokens_for

__all__ = ["EQUIV_TOLERANCE", "COUNT_FIELD", "budget_target", "budget_check", "token_accounting", "tokens_text",
           "stages_text", "budget_message", "decode_only"]


#: how far a row's layer-averaged tokens may lie from its block's N in an "equivalent" table:
#: max(0.5 token, 5% of N). Progressive methods cannot hit N exactly (their stage budgets are
#: whole tokens at fixed layers); SparseVLM's own released tables average 191 / 126 / 62 tokens
#: for its nominal 192 / 128 / 64.
EQUIV_TOLERANCE = 0.05


def budget_target(keep, rec: dict) -> Optional[float]:
    """Visual tokens a question keeps after the last stage at budget ``keep`` by vtoken's rule
    (:func:`vtoken.plan.tokens_for` per image / video segment; structural tokens such as image
    newlines are never pruned): from the record's ``segment_tokens`` (prunable tokens per segment)
    and ``visual_tokens``; a record without segments counts as one segment. None if unknown."""
    if keep is None:
        return None
    visual = rec.get("visual_tokens")
    segs = rec.get("segment_tokens")
    if segs:
        structural = (visual - sum(segs)) if visual is not None else 0
        return float(sum(tokens_for(keep, int(c)) for c in segs) + max(structural, 0))
    if visual is None:
        return None
    return float(tokens_for(keep, int(visual)))


COUNT_FIELD = {"final": "kept_tokens", "equivalent": "equivalent_tokens"}


def budget_check(keep, recs: list, count: str = "final", tolerance: float = EQUIV_TOLERANCE) -> Optional[dict]:
    """Does a row placed in the block "Retain ``keep``" keep that budget by ``count``?

    Per question, the measured count (``kept_tokens`` for "final", ``equivalent_tokens`` for
    "equivalent") is compared with :func:`budget_target`: "final" must match exactly,
    "equivalent" within max(0.5, ``tolerance`` x target). Returns ``{"count", "budget",
    "target", "measured", "ok", "off"}`` (means over questions; ``off`` = questions that miss;
    ``ok`` None when some question has no recorded count), or None for the upper bound."""
    if keep is None:
        return None
    field_ = COUNT_FIELD[count]
    targets, measured, off, unknown = [], [], 0, 0
    for r in recs:
        m, t = r.get(field_), budget_target(keep, r)
        if m is None or t is None:
            unknown += 1
            continue
        targets.append(t)
        measured.append(float(m))
        miss = abs(m - t) > (1e-6 if count == "final" else max(0.5, tolerance * t))
        off += bool(miss)
    ok = None if (unknown or not recs) else off == 0
    return {"count": count, "budget": keep_key(keep), "target": _mean(targets), "measured": _mean(measured),
            "ok": ok, "off": off, "unknown": unknown, "questions": len(recs)}


def _stage_means(recs: list):
    """(mean visual tokens after each stage, stage layers) over ``recs`` when they all ran the same
    stages, else (None, None)."""
    runs = [(tuple(r["stage_layers"]), r["kept_per_stage"]) for r in recs
            if r.get("kept_per_stage") is not None and r.get("stage_layers") is not None]
    if not runs or len(runs) != len(recs) or len({lay for lay, _ in runs}) != 1:
        return None, None
    layers = list(runs[0][0])
    if any(len(k) != len(layers) for _, k in runs):
        return None, None
    return [statistics.fmean(k[i] for _, k in runs) for i in range(len(layers))], layers


def token_accounting(method: str, keep, recs: list, count: str = "final") -> dict:
    """A row's visual-token columns from its (successful) prediction records: means of the
    measured final / layer-averaged / original tokens, the per-stage means and the budget check."""
    per_stage, layers = _stage_means(recs)
    return {
        "kept_tokens": _mean(r.get("kept_tokens") for r in recs),
        "equivalent_tokens": _mean(r.get("equivalent_tokens") for r in recs),
        "visual_tokens": _mean(r.get("visual_tokens") for r in recs),
        "kept_per_stage": per_stage, "stage_layers": layers,
        "budget_check": None if method == "none" else budget_check(keep, recs, count),
    }


def tokens_text(x) -> str:
    return "–" if x is None else (f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}")


def stages_text(row: dict) -> str:
    """"L1:66 → L2:30 → L3:17" (mean visual tokens after each stage), "–" without stages."""
    if not row.get("kept_per_stage"):
        return "–"
    return " → ".join(f"L{layer}:{tokens_text(k)}" for layer, k in zip(row["stage_layers"], row["kept_per_stage"]))


def decode_only(row: dict) -> bool:
    """A row of a plan with decode-time stages and no prefill stage (``a2sf``, ``lookm``,
    ``lazyllm``, ``zipvl_kv``): no prefill kept counts exist to check against the budget."""
    if row.get("kept_tokens") is not None or row.get("method") in (None, "none"):
        return False
    from vtoken.errors import PruningConfigError
    from vtoken.methods import method_spec

    try:
        return method_spec(row["method"]).family == "decode"
    except PruningConfigError:  # an unregistered name in an old results file
        return False


def budget_message(row: dict, block: str) -> Optional[str]:
    """A sentence for a row that does not (or cannot be shown to) keep its block's budget."""
    chk = row.get("budget_check")
    if not chk or chk["ok"]:
        return None
    if chk["ok"] is None and decode_only(row):
        return (f"{row['label']} in \"{block}\" is a decode-time plan: the prefill keeps every visual token "
                "and its stages evict or compress KV entries from the first decode step on, so the first "
                "generated token (from the prefill) is the unpruned model's and short answers barely "
                "move; the row measures what the eviction changes in the later tokens only.")
    if chk["ok"] is None:
        return (f"{row['label']} in \"{block}\": visual-token counts not recorded for {chk['unknown']} of "
                f"{chk['questions']} question(s); its budget is unverified.")
    if chk["count"] == "final":
        keeps = f"keeps {tokens_text(chk['measured'])} visual tokens per image after its last stage"
    else:
        keeps = f"averages {tokens_text(chk['measured'])} visual tokens per image over the LLM's layers"
    return (f"{row['label']} in \"{block}\" {keeps}, not {tokens_text(chk['target'])} "
            f"({chk['off']} of {chk['questions']} question(s) off; final {tokens_text(row['kept_tokens'])}, "
            f"layer-averaged {tokens_text(row['equivalent_tokens'])}, per stage {stages_text(row)}): "
            "not compared at equal tokens.")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None
