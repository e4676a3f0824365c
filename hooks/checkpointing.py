"""Gradient checkpointing through pruned layers.

With ``model.gradient_checkpointing_enable()`` a decoder layer's forward runs twice: once in the
forward pass (its saved tensors dropped) and again during ``backward`` to recompute them; the two
runs must save the same tensors. vtoken's additions must therefore not change between the runs:

- what the probes and stages compute on the side (attention rows, scores, merges, gathers) runs
  under :func:`outside_recompute`, whose saved tensors are kept the ordinary way, so the layer's
  recomputation (which does not run them) finds the same list;
- where transformers runs the layer's forward pre-hooks inside the checkpointed function
  (transformers < 5.2x; later versions checkpoint ``forward`` only), the recomputation calls the
  pre-hook again after the call's context is gone: :func:`remember` stores what the hook did on
  the layer's input tensor and :func:`recall` does it again (:func:`vtoken.hooks.stage.redo_stage`
  on the same input, then the same keyword arguments), which also carries the gradient when the
  checkpoint is reentrant (the first run had no graph).
"""

from __future__ import annotations

from typing import Optional

import torch

_REDO_ATTR = "_vtoken_redo"


def _identity(t):
    return t


def outside_recompute():
    """A context in which saved tensors are kept as usual, even inside a checkpointed region."""
    return torch.autograd.graph.saved_tensors_hooks(_identity, _identity)


def checkpointing(module) -> bool:
    """Whether ``module``'s forward is recomputed in backward (gradient checkpointing, training)."""
    return bool(getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled())


def remember(hidden_in: torch.Tensor, ops, span: dict) -> None:
    """Record on the layer's input ``hidden_in`` what the pre-hook did: ``ops`` (a
    :class:`vtoken.hooks.call_state.StageOps`, or None for a layer after the stage) and the
    keyword arguments it set (``span``). The record lives as long as the input tensor."""
    setattr(hidden_in, _REDO_ATTR, (ops, dict(span)))


def recall(args: tuple, kwargs: dict) -> Optional[tuple]:
    """The pre-hook's result for a recomputation of a layer whose input carries a record, else None."""
    hidden_in = args[0] if args else kwargs.get("hidden_states")
    record = getattr(hidden_in, _REDO_ATTR, None) if torch.is_tensor(hidden_in) else None
    if record is None:
        return None
    ops, span = record
    if ops is not None:
        from vtoken.hooks.stage import redo_stage

        with outside_recompute():
            hidden = redo_stage(hidden_in, ops)
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
    kwargs.update(span)
    return args, kwargs
