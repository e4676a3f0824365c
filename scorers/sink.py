"""Sink redistribution: VAR (Visual Attention Redistribution), and its method preset (registered
with :func:`vtoken.methods.register_method`)."""

from __future__ import annotations

from typing import Optional

import torch

from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.attention_base import MODIFIERS, SINK_NEEDS, AttentionScorer
from vtoken.scorers.base import Selection, demote, masked_scores, promote, topk_mask, topk_selection
from vtoken.signals import SegmentSignals


@register_scorer
class VARScorer(AttentionScorer):
    """VAR (Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal
    Models", ICLR 2025, arXiv:2503.03321), used as a pruning score.

    1. Visual sink tokens are the visual tokens with a massive activation in one of a few
       "sink dimensions" of their hidden state: |RMSNorm(h)_d| > ``tau`` (20). VAR fixes the sink
       dimensions per model (those of the BOS token's massive activations); with ``dims=None``
       vtoken finds them from the data: the ``num_dims`` (2) dimensions with the largest
       activation above ``tau`` among the sample's visual and text tokens.
    2. Sinks are excluded from the ranking (ranked last; ``keep_sinks=True`` instead keeps
       them first, as BlindSight recommends for stability).
    3. Image-centric heads: heads of the last prompt token's row whose attention on the image
       is at least ``summ`` (0.2) and of which at most ``rho`` (0.5) goes to visual sinks.
       In those heads a share (1 - ``p``) = 0.4 of the attention absorbed by the sinks (visual
       sinks and text sinks, found the same way in the text tokens) is redistributed to the
       non-sink visual tokens in proportion to their attention.
    4. Score = the redistributed attention averaged over the image-centric heads (all heads if
       none qualifies).

    Defaults (tau, rho, summ, p) are the official code's. VAR redistributes attention inside the
    forward pass at every layer from 2 on; vtoken uses the redistributed attention of layer K-1
    only as the ranking signal and leaves the model's attention untouched. Given the same
    attention row, hidden states and sink dimensions (``dims``), the image-centric heads and the
    redistributed row are the released code's (seilk/VisAttnSink@98e62d6, ``src/logic/logic.py``:
    ``DimProspector``, ``HeadFork``, ``VARProcessor.attn_redist``; checked by
    ``tests/test_fidelity_var.py``), including: an image with no visual sink has no
    image-centric head, and the sink portion's denominator adds 1e-6 per visual token. The code
    finds sinks in the hidden states entering the attention's own layer (K-1); vtoken reads those
    entering layer K (the ``hidden`` signal), the nearest it has.

    ``sink_rule`` (default ``"var"``, the rule above) replaces step 1 for the visual sinks by
    another rule of :class:`~vtoken.scorers.attention_base.AttentionScorer`, with ``sink_tau`` as
    its threshold: ``"act"`` (ACT's attention-received rule, adds the signals ``attn_text`` and
    ``text_after``) or ``"secondary"`` (alignment with the primary sink). The text sinks, which
    only size the redistributed share, keep VAR's massive-activation rule (``tau``).

    Signals: ``attn_last`` (S, H, n), ``attn_last_text`` (S, H, T), ``hidden`` (S, n, D),
    ``text_hidden`` (S, T, D). Diagnostics: ``sinks`` (S,) visual sinks found,
    ``image_heads`` (S,) image-centric heads used.
    """

    name = "var"
    needs = frozenset({"attn_last", "attn_last_text", "hidden", "text_hidden"})

    def __init__(
        self,
        tau: float = 20.0,
        rho: float = 0.5,
        summ: float = 0.2,
        p: float = 0.6,
        dims: Optional[list] = None,
        num_dims: int = 2,
        keep_sinks: bool = False,
        **modifiers,
    ):
        if modifiers.get("sink_rule", "var") == "var":
            modifiers.setdefault("sink_tau", tau)
        super().__init__(**modifiers)
        self.needs = frozenset(self.needs | SINK_NEEDS[self.sink_rule])
        self.tau = float(tau)
        self.rho = float(rho)
        self.summ = float(summ)
        self.p = float(p)
        self.dims = None if dims is None else [int(d) for d in dims]
        self.num_dims = int(num_dims)
        self.keep_sinks = bool(keep_sinks)

    def sinks(self, sig: SegmentSignals) -> tuple:
        """(visual sinks (S, n) bool, text sinks (S, T) bool)."""
        if self.dims is not None:
            d = torch.tensor(self.dims, dtype=torch.long, device=sig.hidden.device).expand(sig.hidden.shape[0], -1)
        else:
            d = F.sink_dimensions(sig.hidden, sig.mask, self.tau, self.num_dims, sig.text_hidden, sig.text_mask)
        if self.sink_rule == "var":
            vis = F.massive_activation_tokens(sig.hidden, d, self.tau) & sig.mask
        else:
            vis = self.rule_sinks(sig)
            if vis is None:
                raise ValueError(f"var with sink_rule={self.sink_rule!r} needs the signals {sorted(self.needs)}")
        if sig.text_hidden is not None and sig.text_hidden.shape[1] > 0:
            txt = F.massive_activation_tokens(sig.text_hidden, d, self.tau)
            if sig.text_mask is not None:
                txt = txt & sig.text_mask
        else:
            txt = torch.zeros(sig.mask.shape[0], 0, dtype=torch.bool, device=sig.mask.device)
        return vis, txt

    def redistributed(self, sig: SegmentSignals, vis_sink: torch.Tensor, txt_sink: torch.Tensor) -> tuple:
        """(per-head redistributed attention (S, H, n), image-centric heads (S, H) bool)."""
        a = sig.attn_last.float().masked_fill(~sig.mask.unsqueeze(1), 0.0)  # (S, H, n)
        image_sum = a.sum(dim=2)
        sink_vis = (a * vis_sink.unsqueeze(1)).sum(dim=2)
        # the released HeadFork: sum(image_attn + 1e-6) (1e-6 per visual token), and no head is
        # image-centric in an image without visual sinks (text sinks alone redistribute nothing)
        portion = sink_vis / (image_sum + 1e-6 * sig.mask.sum(dim=1, keepdim=True).float())
        centric = (portion <= self.rho) & (image_sum >= self.summ) & vis_sink.any(dim=1, keepdim=True)
        if sig.attn_last_text is not None and txt_sink.shape[1] > 0:
            sink_txt = (sig.attn_last_text.float() * txt_sink.unsqueeze(1)).sum(dim=2)
        else:
            sink_txt = torch.zeros_like(sink_vis)
        budget = (1.0 - self.p) * (sink_vis + sink_txt)  # (S, H)
        non = a.masked_fill(vis_sink.unsqueeze(1), 0.0)
        ratio = non / non.sum(dim=2, keepdim=True).clamp(min=1e-30)
        red = torch.where(vis_sink.unsqueeze(1), a * self.p, non + budget.unsqueeze(-1) * ratio)
        out = torch.where(centric.unsqueeze(-1), red, a)
        return out, centric

    def scores_and_sinks(self, sig: SegmentSignals) -> tuple:
        """(raw VAR scores (S, n), visual sinks (S, n) bool)."""
        vis_sink, txt_sink = self.sinks(sig)
        red, centric = self.redistributed(sig, vis_sink, txt_sink)
        use = torch.where(centric.any(dim=1, keepdim=True), centric, torch.ones_like(centric)).float()  # (S, H)
        score = (red * use.unsqueeze(-1)).sum(dim=1) / use.sum(dim=1, keepdim=True).clamp(min=1)
        sig.diagnostics["sinks"] = vis_sink.sum(dim=1)
        sig.diagnostics["image_heads"] = centric.sum(dim=1)
        return score, vis_sink

    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:
        return self.scores_and_sinks(sig)[0]

    def score(self, sig: SegmentSignals) -> torch.Tensor:
        score, vis_sink = self.scores_and_sinks(sig)
        score = self.modify(sig, score)
        return promote(score, vis_sink, sig.mask) if self.keep_sinks else demote(score, vis_sink, sig.mask)

    def select(self, sig: SegmentSignals) -> Selection:
        scores = self.score(sig)
        return topk_selection(scores, sig.mask, sig.budget)


@register_method(name="var", family="sink",
                 released_code="seilk/VisAttnSink@98e62d6",
                 paper="Kang et al., ICLR 2025 (arXiv:2503.03321); sink_rule: ACT, Yu et al., ICML 2024 "
                       "(arXiv:2406.15765), secondary sinks, Wong et al. 2025 (arXiv:2512.22213)",
                 stages="layer K=2", needs_attention=True, text_guided=True,
                 options=("K", "tau", "rho", "summ", "p", "dims", "num_dims", "keep_sinks", "mode") + MODIFIERS)
def var_plan(keep, K: int = 2, tau: float = 20.0, rho: float = 0.5, summ: float = 0.2, p: float = 0.6, dims=None,
             num_dims: int = 2, keep_sinks: bool = False, mode: str = "select", **modifiers):
    """VAR preset: one stage at layer ``K`` ranked by sink-redistributed attention."""
    scorer = VARScorer(tau=tau, rho=rho, summ=summ, p=p, dims=dims, num_dims=num_dims, keep_sinks=keep_sinks,
                       **modifiers)
    return [Stage(layer=K, scorer=scorer, keep=validate_budget(keep), mode=mode)]


__all__ = ["VARScorer", "var_plan"]
