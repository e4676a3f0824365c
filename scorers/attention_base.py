"""The base of the attention-ranked scorers: :class:`AttentionScorer` and its two modifiers.

Every attention-ranked scorer (:mod:`~vtoken.scorers.attention`, :mod:`~vtoken.scorers.visionzip`,
:mod:`~vtoken.scorers.sparsevlm`, :mod:`~vtoken.scorers.flow`, :mod:`~vtoken.scorers.sink`) derives
from :class:`AttentionScorer` and therefore takes two modifiers (every attention-ranked preset
passes them through: :data:`MODIFIERS`):

* ``debias=True`` -- Attention Debiasing (Zhao et al., "Attention Debiasing for Token Pruning in
  Vision Language Models", arXiv:2508.17807): before ranking, divide each image's attention
  scores by their fitted positional (recency) trend, and suppress the inflated attention on
  padding / empty tokens.
* ``exclude_sinks=True`` -- visual sink exclusion: sink tokens are ranked below every other token.
  ``sink_rule`` picks how sinks are found (:data:`~vtoken.scorers.functional_sinks.SINK_RULES`):
  ``"var"`` (default) massive activations in a few hidden dimensions (VAR, Kang et al., ICLR 2025);
  ``"act"`` attention received above a threshold in some head (ACT, Yu et al., ICML 2024);
  ``"secondary"`` hidden states aligned with the primary sink's (Wong et al., arXiv:2512.22213).

It registers nothing itself.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vtoken.errors import PruningConfigError
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
    exclude_sinks:   rank visual sink tokens last. ``sink_rule`` says which tokens are sinks, and
                     ``sink_tau`` is that rule's threshold (None = the rule's default):
                     ``"var"``: massive activation > ``sink_tau`` (20) times the RMS in one of
                     the sink dimensions (:func:`functional.visual_sinks`; signal ``hidden``);
                     ``"act"``: attention received from the prompt after the image, averaged
                     over those queries, > ``sink_tau`` (0.1) in some head at layer K-1
                     (:func:`functional.act_sinks`; signals ``attn_text``, ``text_after``);
                     ``"secondary"``: |cosine| of the hidden state with the primary sink's
                     (the highest-norm of the first 3 text tokens) > ``sink_tau`` (0.9)
                     (:func:`functional.secondary_sinks`; signals ``hidden``, ``text_hidden``).
                     Each function's docstring states how it departs from its paper.
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
        sink_tau=None,
        sink_rule: str = "var",
    ):
        if debias_trend not in ("exp", "linear"):
            raise ValueError(f"debias_trend must be 'exp' or 'linear'; got {debias_trend!r}")
        if sink_rule not in F.SINK_RULES:
            rules = ", ".join(map(repr, F.SINK_RULES))
            raise PruningConfigError(f"sink_rule must be one of {rules}; got {sink_rule!r}")
        self.debias = bool(debias)
        self.exclude_sinks = bool(exclude_sinks)
        self.debias_trend = debias_trend
        self.debias_padding = bool(debias_padding)
        self.empty_weight = float(empty_weight)
        self.sink_rule = sink_rule
        self.sink_tau = float(F.SINK_RULES[sink_rule] if sink_tau is None else sink_tau)
        extra = set()
        if self.debias and self.debias_padding:
            extra.add("hidden")
        if self.exclude_sinks:
            extra |= SINK_NEEDS[sink_rule]
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
        if self.exclude_sinks:
            sinks = self.rule_sinks(sig)
            if sinks is not None:
                s = demote(s, sinks, sig.mask)
                sig.diagnostics["sinks"] = sinks.sum(dim=1)
        return s

    def rule_sinks(self, sig: SegmentSignals):
        """(S, n) bool visual sinks by ``sink_rule`` and ``sink_tau``, or None when the rule's
        signals are absent."""
        if self.sink_rule == "act":
            if sig.attn_text is None or sig.text_after is None:
                return None
            return F.act_sinks(sig.attn_text, sig.text_after, sig.mask, tau=self.sink_tau)
        if sig.hidden is None:
            return None
        if self.sink_rule == "secondary":
            if sig.text_hidden is None or sig.text_mask is None:
                return None
            return F.secondary_sinks(sig.hidden, sig.mask, sig.text_hidden, sig.text_mask, cos=self.sink_tau)
        return F.visual_sinks(sig.hidden, sig.mask, tau=self.sink_tau)


#: the signals each sink rule reads
SINK_NEEDS = {"var": frozenset({"hidden"}), "act": frozenset({"attn_text", "text_after"}),
               "secondary": frozenset({"hidden", "text_hidden"})}

#: options every attention-ranked method accepts (the AttentionScorer modifiers)
MODIFIERS = ("debias", "exclude_sinks", "debias_trend", "debias_padding", "empty_weight", "sink_tau", "sink_rule")


__all__ = ["AttentionScorer", "MODIFIERS", "SINK_NEEDS"]
