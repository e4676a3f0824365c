"""The statistics of an eval table, as plain functions of counts and per-question scores (standard
library and numpy only):

* :func:`wilson_interval` — the Wilson score interval of a proportion (Wilson 1927, "Probable
  inference, the law of succession, and statistical inference", JASA 22:209-212): the 95 % interval
  of an accuracy whose per-question scores are 0 or 1. Unlike the normal ("Wald") interval it stays
  inside [0, 1] and is not empty at 0/n or n/n.
* :func:`bootstrap_interval` — the percentile bootstrap (Efron 1979) of any statistic of the
  questions, with a fixed seed so that a table is reproducible: for scores that are not a mean of
  0/1 per question (VQA accuracy, POPE F1, MME totals, the retained-accuracy average).
* :func:`mcnemar_exact` — the exact two-sided McNemar test (McNemar 1947, "Note on the sampling error
  of the difference between correlated proportions or percentages", Psychometrika 12:153-157): a
  binomial test, p = 1/2, on the discordant pairs of two paired 0/1 answer vectors.
* :func:`paired_sign_test` — McNemar's test on two score vectors over the same questions: a question
  counts for the first (second) when its score is higher (lower); ties are concordant. On 0/1
  scores it is McNemar's test; on graded scores (VQA's 0 / 0.3 / ... / 1) the exact sign test.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

__all__ = ["Z95", "ALPHA", "BOOTSTRAP_SAMPLES", "BOOTSTRAP_SEED", "wilson_interval", "bootstrap_interval",
           "mcnemar_exact", "paired_sign_test", "is_binary"]

#: two-sided 95 % normal quantile
Z95 = 1.959963984540054
#: significance level of the comparisons with random
ALPHA = 0.05
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple:
    """(low, high) of the Wilson score interval of ``successes`` out of ``n``, as fractions in [0, 1].

    ``center = (p + z²/2n) / (1 + z²/n)``, ``half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)``
    (Wilson 1927). ``n = 0`` gives (0, 1): nothing is known.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: {successes} successes out of {n}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo, hi = center - half, center + half
    # exact bounds at the edges (rounding would leave 1e-17 off them)
    return (0.0 if successes == 0 else max(0.0, lo)), (1.0 if successes == n else min(1.0, hi))


def bootstrap_interval(sizes, statistic: Callable, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> Optional[tuple]:
    """(low, high) percentile-bootstrap interval (Efron 1979) of a statistic of the questions.

    sizes:     the number of questions, or a sequence of numbers (one per stratum, e.g. per data set:
               each stratum is resampled on its own).
    statistic: takes one numpy integer array of question indices per stratum (drawn with
               replacement, as many as the stratum has), as a tuple when ``sizes`` is a sequence, and
               returns a number, or ``None`` where the statistic is undefined on that draw (such draws
               are left out).
    The draws come from ``numpy.random.default_rng(seed)``: the same call gives the same interval.
    Returns ``None`` when a stratum is empty or no draw gives a value.
    """
    import numpy as np

    single = isinstance(sizes, int)
    sizes = (sizes,) if single else tuple(sizes)
    if not sizes or min(sizes) <= 0:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        draw = tuple(rng.integers(0, n, size=n) for n in sizes)
        v = statistic(draw[0] if single else draw)
        if v is not None:
            values.append(float(v))
    if not values:
        return None
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(np.asarray(values), [tail, 100 - tail])
    return float(lo), float(hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` discordant pairs (McNemar 1947).

    Under the null hypothesis each of the ``b + c`` discordant pairs falls either way with
    probability 1/2: ``p = min(1, 2 · sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c))``; no discordant
    pair gives p = 1. Computed with exact integers (``math.comb``).
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: negative count (b={b}, c={c})")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_sign_test(first: Sequence, second: Sequence) -> dict:
    """McNemar's exact test between two methods' scores on the same questions (same order).

    Returns ``{"n", "better", "worse", "p"}``: questions where ``first`` scores higher / lower than
    ``second``, and :func:`mcnemar_exact` of those counts.
    """
    if len(first) != len(second):
        raise ValueError(f"paired_sign_test: {len(first)} against {len(second)} questions")
    better = sum(1 for a, b in zip(first, second) if a > b)
    worse = sum(1 for a, b in zip(first, second) if a < b)
    return {"n": len(first), "better": better, "worse": worse, "p": mcnemar_exact(better, worse)}


def is_binary(scores) -> bool:
    """True when every per-question score is 0 or 1 (an accuracy: Wilson applies)."""
    return all(s == 0 or s == 1 for s in scores)
