"""The eval script: retained-accuracy tables of pruning methods on VQA sets (docs/DESIGN.md §6).

Command line: ``vtoken eval ...`` or ``python -m vtoken.eval ...`` (see :mod:`vtoken.eval.cli`).
From Python::

    from vtoken.eval import EvalConfig, run_eval
    results = run_eval(EvalConfig(model="vtoken/tiny-llava", data=["synthetic"], methods=["fastv"],
                                  keeps=[192, 64], limit=32, out="runs/tiny"))

Metrics: :mod:`vtoken.eval.metrics`; data-set loaders: :mod:`vtoken.eval.loaders`.
"""

from vtoken.eval.runner import EvalConfig, run_eval

__all__ = ["EvalConfig", "run_eval"]
