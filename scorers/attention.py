"""Attention-based scorers."""

from __future__ import annotations

import torch

from vtoken.scorers.base import Scorer
from vtoken.signals import SegmentSignals


class FastVScorer(Scorer):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

    At layer K (default 2) each visual token is scored by the attention it receives from the
    last (prompt) token in layer K-1, averaged over heads; the top tokens are kept with their
    original positions.

    Signals: ``attn_last`` (S, H, n) -> scores (S, n).
    """

    name = "fastv"
    needs = frozenset({"attn_last"})

    def score(self, sig: SegmentSignals) -> torch.Tensor:
        return sig.attn_last.float().mean(dim=1)
