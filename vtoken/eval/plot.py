"""The eval's plot.png: retained accuracy (% of unpruned) against the visual tokens a row keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from vtoken.eval.accounting import COUNT_FIELD

__all__ = ["plot_retained"]


def plot_retained(path: Path, rows, upper_tokens, title: str, count: str = "final") -> Optional[str]:
    """Retained accuracy against visual tokens kept, one line per method (``None``, or why no plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot.png"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    methods, labels = [], {r["method"]: r.get("label", r["method"]) for r in rows}
    for r in rows[1:]:
        if r["method"] not in methods:
            methods.append(r["method"])
    field_ = COUNT_FIELD[count]
    for m in methods:
        pts = sorted((r[field_], r["avg_retained_pct"]) for r in rows
                     if r["method"] == m and not r.get("failed")
                     and r[field_] is not None and r["avg_retained_pct"] is not None)
        if upper_tokens:
            pts.append((upper_tokens, 100.0))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=labels[m])
    ax.axhline(100.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("visual tokens kept per image" + (" (final)" if count == "final" else " (layer-averaged)"))
    ax.set_ylabel("retained accuracy (% of unpruned)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if methods:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
