"""The base of the attention-ranked scorers: :class:`AttentionScorer` and its two modifiers.

Every attention-ranked scorer (:mod:`~vtoken.scorers.attention`, :mod:`~vtoken.scorers.visionzip`,
:mod:`~vtoken.scorers.sparsevlm`, :mod:`~vtoken.scorers.flow`, :mod:`~vtoken.scorers.sink`) derives
from :class:`AttentionScorer` and therefore takes two modifiers (every attention-ranked preset
passes them through: :data:`MODIFIERS`):

* ``debias=True`` -- Attention Debiasing (Zhao et al., "Attention Debiasing for Token Pruning in
  Vision Language Models", arXiv:2508.17807): before ranking, divide each image's attention
  scores by their fitted positional (recency) trend, and suppress the inflated attention on
  padding / empty tokens.
* ``exclude_sinks=True`` -- VAR-style visual sink exclusion (Kang et al., ICLR 2025): tokens with
  massive activations in a few hidden dimensions are ranked below every other token.

It registers nothing itself.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vtoken.scorers import functional as F
from vtoken.scorers.base import Scorer, demote
from vtoken.signals import SegmentSignals


class AttentionScorer(Scorer):
    """Base of the attention-ranked scorers: :meth:`raw_scores` then the optional modifiers.

    debias:          Attention Debiasing (arXiv:2508.17807). The paper fits an exponential
                     trend of attention vs. token position offline on a dataset and multiplies
                     the attention by its inverse; here the trend is fitted online, per image,
                     by least squares (``debias_trend="exp"`` as in the paper, or ``"linear"``).
                     The paper zeroes attention on the known padding patches of LLaVA's
                     pad-to-square images; here "empty" tokens are detected from the hidden
                     states (many near-identical tokens, :func:`functional.empty_tokens`) and
                     their score is multiplied by ``empty_weight`` (default 0, as in the paper).
                     ``debias_padding=False`` keeps only the positional part (no hidden states).
    exclude_sinks:   rank visual sink tokens (massive activation > ``sink_tau`` times the RMS in
                     one of the sink dimensions, :func:`functional.visual_sinks`) last.
    """

    #: True when the ranking signal depends on the text prompt
    text_guided: ClassVar[bool] = True

    def __init__(
        self,
        debias: bool = False,
        exclude_sinks: bool = False,
        debias_trend: str = "exp",
        debias_padding: bool = True,
        empty_weight: float = 0.0,
        sink_tau: float = 20.0,
    ):
        if debias_trend not in ("exp", "linear"):
            raise ValueError(f"debias_trend must be 'exp' or 'linear'; got {debias_trend!r}")
        self.debias = bool(debias)
        self.exclude_sinks = bool(exclude_sinks)
        self.debias_trend = debias_trend
        self.debias_padding = bool(debias_padding)
        self.empty_weight = float(empty_weight)
        self.sink_tau = float(sink_tau)
        extra = set()
        if (self.debias and self.debias_padding) or self.exclude_sinks:
            extra.add("hidden")
        self.needs = frozenset(type(self).needs | extra)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in ("needs", "optional_needs"))
        return f"{type(self).__name__}({fields})"

    # subclasses implement this: (S, n) float, higher = more important
    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, sig: SegmentSignals) -> torch.Tensor:
        return self.modify(sig, self.raw_scores(sig))

    def modify(self, sig: SegmentSignals, scores: torch.Tensor) -> torch.Tensor:
        """Apply the enabled modifiers to raw scores (S, n)."""
        s = scores.float().masked_fill(~sig.mask, 0.0)
        if self.debias:
            s = F.remove_positional_trend(s, sig.index, sig.mask, kind=self.debias_trend)
            if self.debias_padding and sig.hidden is not None:
                empty = F.empty_tokens(sig.hidden, sig.mask)
                s = torch.where(empty, s * self.empty_weight, s)
                sig.diagnostics["debias_empty"] = empty.sum(dim=1)
        if self.exclude_sinks and sig.hidden is not None:
            sinks = F.visual_sinks(sig.hidden, sig.mask, tau=self.sink_tau)
            s = demote(s, sinks, sig.mask)
            sig.diagnostics["sinks"] = sinks.sum(dim=1)
        return s


#: options every attention-ranked method accepts (the AttentionScorer modifiers)
MODIFIERS = ("debias", "exclude_sinks", "debias_trend", "debias_padding", "empty_weight", "sink_tau")


__all__ = ["AttentionScorer", "MODIFIERS"]
