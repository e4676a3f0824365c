"""Stand-in networks for the learned methods (``gtc``, ``dyvte``) on the bench's full-size models.

The shipped weights of :mod:`vtoken.scorers.learned` fit the tiny checkpoints only; on LLaVA-1.5-7B
shapes with random weights the methods would refuse (``MissingWeightsError``). Their speed does not
depend on what the networks learned, only on their shapes and, for DyVTE, on where the visual tokens
exit, so the bench passes ``weights=`` networks of the model's shapes:

* ``gtc``: a :class:`GTCMapper` with one input channel per attention head of the language model,
  randomly initialised (seeded): the same convolutions on the same (B, H, 24, 24) maps as trained
  weights, and an arbitrary (but real) ranking.
* ``dyvte``: a :class:`FixedExitRouter`, which evaluates every gate as trained weights would and then
  decides ``exit`` entering layer ``exit_layer`` (default: half the depth, 16 of LLaVA-1.5-7B's 32;
  a fixed choice of the bench, not a trained gate's) and ``continue`` before it, so the rows are
  reproducible rather than set by random gates.
"""

from __future__ import annotations

from typing import Optional

import torch

from vtoken.scorers.learned import DyVTERouter, GTCMapper

LEARNED_METHODS = ("gtc", "dyvte")


class FixedExitRouter(DyVTERouter):
    """A :class:`DyVTERouter` whose gate logits (B, 2) are computed as usual and then replaced by a
    fixed decision: exit (logit 1 > logit 0) for gates ``layer >= exit_layer - 1`` (the gate of layer
    L-1 decides entering layer L), continue before."""

    def __init__(self, hidden_size: int, num_layers: int, exit_layer: int, hidden: int = 64):
        super().__init__(hidden_size, num_layers, hidden)
        if not 1 <= exit_layer < num_layers:
            raise ValueError(f"exit_layer must be in 1..{num_layers - 1}; got {exit_layer}")
        self.exit_layer = int(exit_layer)

    def forward(self, feat: torch.Tensor, layer: int) -> torch.Tensor:
        logits = super().forward(feat, layer)
        exit_ = layer >= self.exit_layer - 1
        decision = torch.tensor([0.0, 1.0] if exit_ else [1.0, 0.0], dtype=logits.dtype, device=logits.device)
        return logits * 0 + decision


def bench_weights(method: str, model, exit_layer: Optional[int] = None, seed: int = 0) -> dict:
    """``apply_pruning`` options giving ``method`` networks of ``model``'s shapes (``{}`` for a
    method that is not learned)."""
    if method not in LEARNED_METHODS:
        return {}
    text = model.config.get_text_config()
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        if method == "gtc":
            net = GTCMapper(heads=int(text.num_attention_heads))
        else:
            depth = int(text.num_hidden_layers)
            net = FixedExitRouter(int(text.hidden_size), depth, exit_layer or depth // 2)
    return {"weights": net.eval()}


__all__ = ["FixedExitRouter", "bench_weights", "LEARNED_METHODS"]
