"""The record a decode-time plan leaves at a prefill, for engines that run its
:class:`vtoken.plan.DecodeStage` s on their own KV storage (:class:`vtoken.engine.StaticDecoder`),
handed out by :meth:`vtoken.hooks.handle.PruningHandle.decode_prefill`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vtoken.scorers.decode_select import stage_eviction


@dataclass(frozen=True)
class DecodePrefill:
    """``plan`` the stages, ``stage_layers`` per stage the layers it prunes, ``n_prefill`` the
    prompt length, ``segment`` (B, n) image of each prunable visual token (-1 elsewhere),
    ``budgets`` per stage (S,) long kept per image, ``scores`` layer -> (B, n) float32 accumulated
    prompt scores (only layers a stage ranks by attention)."""

    plan: tuple
    stage_layers: tuple
    n_prefill: int
    segment: torch.Tensor
    budgets: tuple
    scores: dict

    def eviction(self, index: int, positions: torch.Tensor, scores: Optional[torch.Tensor]) -> torch.Tensor:
        """The slots stage ``index`` evicts from a layer: positions (B, L) prompt index of each slot
        (>= n or -1: generated tokens, padding), scores (B, L) its accumulated scores (None: zeros)
        -> (B, L) bool; the function the dynamic runtime's eviction calls
        (:func:`vtoken.scorers.decode_select.stage_eviction`)."""
        return stage_eviction(self.plan[index].scorer, self.segment, positions, scores, self.budgets[index])
