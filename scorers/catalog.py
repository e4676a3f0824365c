"""Built-in methods: each registers a preset plan builder and its scorer class.

Defaults are the papers' defaults. ``keep`` is the final per-image budget (int tokens or a
fraction in (0, 1]).
"""

from __future__ import annotations

from vtoken.methods import MethodSpec, register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers.attention import FastVScorer
from vtoken.scorers.baselines import KeepAllScorer, RandomScorer, UniformScorer

for _cls in (FastVScorer, RandomScorer, UniformScorer, KeepAllScorer):
    register_scorer(_cls)


def _fastv(keep, K: int = 2, mode: str = "select"):
    return [Stage(layer=K, scorer=FastVScorer(), keep=validate_budget(keep), mode=mode)]


def _random(keep, layer: int = 0, seed: int = 0):
    return [Stage(layer=layer, scorer=RandomScorer(seed=seed), keep=validate_budget(keep))]


def _uniform(keep, layer: int = 0):
    return [Stage(layer=layer, scorer=UniformScorer(), keep=validate_budget(keep))]


def _none(keep=1.0, layer: int = 0):
    return [Stage(layer=layer, scorer=KeepAllScorer(), keep=1.0)]


register_method(MethodSpec("fastv", "attention", _fastv, paper="Chen et al., ECCV 2024 (arXiv:2403.06764)",
                           stages="layer K=2", needs_attention=True, text_guided=True, options=("K", "mode")))
register_method(MethodSpec("random", "baseline", _random, stages="layer 0", options=("layer", "seed")))
register_method(MethodSpec("uniform", "baseline", _uniform, stages="layer 0", options=("layer",)))
register_method(MethodSpec("none", "baseline", _none, stages="-", options=("layer",)))
