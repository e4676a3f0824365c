"""Diversity / effective-rank scorers: DivPrune, DART, AgilePruner (attention vs. diversity).

Each puts the effective rank (:func:`erank`) of the tokens it keeps into
``sig.diagnostics["erank"]`` (S,), and the normalised attention entropy into
``sig.diagnostics["attn_entropy"]`` (S,) when it reads attention.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.base import Scorer, Selection, masked_scores, topk_mask
from vtoken.scorers.functional import erank
from vtoken.signals import SegmentSignals


def _order(x: torch.Tensor) -> torch.Tensor:
    """Indices of each row's entries from the largest, ties towards the lower index (a stable
    sort: deterministic everywhere); the first k of a row are its top k."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices


def _first(order: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """(S, n) bool: the first ``take[s]`` (S,) slots of each row's ``order`` (S, n) -- a ragged
    top-k of all rows at once (a row's k may exceed its real slots only if its order says so)."""
    ranks = torch.arange(order.shape[1], device=order.device)
    return torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter_(
        1, order, ranks < take.unsqueeze(1))


def _rank_scores(order: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores for heatmaps from a pick order: earlier picks score higher, unpicked score 0."""
    n = mask.shape[1]
    s = torch.where(keep, (n - order).float(), torch.zeros(order.shape, dtype=torch.float32, device=order.device))
    return masked_scores(s, mask)


@register_scorer
class DivPruneScorer(Scorer):
    """DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
    Multimodal Models", CVPR 2025, arXiv:2503.02175).

    Token selection as a Max-Min Diversity Problem over the projected visual embeddings (the
    hidden states entering the LLM, layer 0), with distance 1 - cosine similarity, solved
    greedily: the first token is the one whose nearest neighbour is farthest; each next token
    maximises its minimum distance to the tokens already chosen. Text-agnostic.

    Signals: ``hidden`` (S, n, D) -> Selection (exactly ``budget`` tokens per segment).
    Diagnostics: ``erank`` (S,) of the kept tokens.
    """

    name = "divprune"
    needs = frozenset({"hidden"})
    text_guided: ClassVar[bool] = False

    def select(self, sig: SegmentSignals) -> Selection:
        keep, order = F.greedy_maxmin(sig.hidden, sig.mask, sig.budget)
        sig.diagnostics["erank"] = F.deferred_erank(sig.hidden, keep)
        return Selection(keep=keep, scores=_rank_scores(order, keep, sig.mask))


@register_method(name="divprune", family="diversity", paper="Alvar et al., CVPR 2025 (arXiv:2503.02175)",
                 released_code="vbdi/divprune@799e2d9",
                 stages="layer 0 (before the LLM)", needs_attention=False, text_guided=False, options=("layer", "mode"))
def divprune_plan(keep, layer: int = 0, mode: str = "select"):
    """DivPrune preset: one stage at ``layer`` (default before the LLM)."""
    return [Stage(layer=layer, scorer=DivPruneScorer(), keep=validate_budget(keep), mode=mode)]


@register_scorer
class DARTScorer(Scorer):
    """DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More", EMNLP 2025, arXiv:2502.11494).

    The released rule (the authors' ``get_retained_image_token``, applied at layer K = 2):

    1. Pivots. The ``pivot_image`` (4) visual tokens of the segment and the ``pivot_text`` (4)
       text tokens AFTER the segment's image (the prompt that follows it, up to the end of the
       prompt; never the BOS / system prompt / tokens before the image) with the largest L1 norm
       of their key states at layer K-1 (post-RoPE, all key heads concatenated).
    2. Features. Hidden states entering layer K, passed through the LLM's final norm (the
       released code applies ``self.norm`` before the cosine similarity; the runtime provides
       them as ``normed_hidden`` / ``normed_text_hidden``).
    3. Selection. The visual pivots are kept. Pivot by pivot, each pivot keeps the tokens LEAST
       similar to it (cosine similarity) among the visual tokens that are neither pivots nor
       already kept by an earlier pivot (no duplicates across pivots).

    Budget. The released code lets each of the P = pivot_image + pivot_text pivots take
    ``TOKEN_TOPK = M // P`` tokens (M = its "max_num_trunction"), so it keeps
    pivot_image + P * (M // P) tokens. vtoken keeps exactly the budget k: the visual pivots count
    in it, and the other k - pivot_image tokens are split over the pivots as evenly as possible:
    each pivot takes (k - pivot_image) // P and the first (k - pivot_image) % P pivots one more
    (k = 12: one per pivot; k = 64: 8 for each visual pivot, 7 for each text pivot). For
    k = pivot_image + P * t this is the released rule with TOKEN_TOPK = t. With fewer than
    ``pivot_text`` text tokens after the image, all of them are pivots (none: visual pivots
    only); with k < ``pivot_image`` the k visual tokens of largest key norm are kept.

    Pivot order. The released code visits the pivots in Python-set order of their absolute
    sequence indices, which a per-segment scorer cannot reproduce; vtoken visits the visual
    pivots by decreasing key norm, then the text pivots by decreasing key norm (ties: lower
    index first), and the remainder goes to the pivots visited first.

    Opt-in deviations from the released rule (defaults reproduce it):

    - ``key_norm=2``: rank pivots by the L2 norm of the keys. Keys carry RoPE, and a rotation
      changes L1 norms but not L2 norms, so with L1 the pivots depend on each token's absolute
      position (a sample placed at other positions may pick other pivots); L2 does not.
    - ``text_pivots="all"``: text pivots drawn from every text token of the sample (BOS, system
      prompt, image-start tokens included), vtoken's former behaviour.
    - ``final_norm=False``: cosine similarities of the raw hidden states entering layer K (the
      final norm skipped, vtoken's former behaviour). The norm's per-dimension weights change
      the cosine, so on a trained model this changes the kept set.

    Signals: ``keys`` (S, n, Dk), ``hidden`` (S, n, D, for the erank diagnostic) and
    ``normed_hidden`` (S, n, D) (``hidden`` when ``final_norm=False``); with text pivots also
    ``text_keys`` (S, T, Dk), ``normed_text_hidden`` (S, T, D) (``text_hidden`` when
    ``final_norm=False``) and ``text_after`` (S, T) (not with ``text_pivots="all"``).
    Diagnostics: ``erank`` (S,) of the kept tokens (raw hidden states). Scores (heatmaps):
    minus the largest cosine similarity to any pivot.
    """

    name = "dart"
    needs = frozenset({"hidden", "keys", "normed_hidden", "text_keys", "normed_text_hidden", "text_after"})
    text_guided: ClassVar[bool] = True
    TEXT_PIVOTS = ("after_image", "all")

    def __init__(self, pivot_image: int = 4, pivot_text: int = 4, key_norm: int = 1, text_pivots: str = "after_image",
                 final_norm: bool = True):
        if pivot_image < 0 or pivot_text < 0 or pivot_image + pivot_text == 0:
            raise ValueError(f"need at least one pivot; got pivot_image={pivot_image}, pivot_text={pivot_text}")
        if key_norm not in (1, 2):
            raise ValueError(f"key_norm must be 1 (the released L1) or 2 (RoPE-invariant L2); got {key_norm!r}")
        if text_pivots not in self.TEXT_PIVOTS:
            raise ValueError(f"text_pivots must be one of {self.TEXT_PIVOTS}; got {text_pivots!r}")
        self.pivot_image = int(pivot_image)
        self.pivot_text = int(pivot_text)
        self.key_norm = int(key_norm)
        self.text_pivots = text_pivots
        self.final_norm = bool(final_norm)
        needs = {"hidden", "keys"} | ({"normed_hidden"} if self.final_norm else set())
        if self.pivot_text:
            needs |= {"text_keys", "normed_text_hidden" if self.final_norm else "text_hidden"}
            if text_pivots == "after_image":
                needs.add("text_after")
        self.needs = frozenset(needs)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "needs")
        return f"{type(self).__name__}({fields})"

    def _text_rows(self, sig: SegmentSignals):
        """(S, T) bool: the text rows that may be pivots, or None (no text pivots)."""
        keys = sig.text_keys
        if not self.pivot_text or keys is None or keys.shape[1] == 0:
            return None
        rows = sig.text_mask if sig.text_mask is not None else torch.ones(keys.shape[:2], dtype=torch.bool,
                                                                          device=keys.device)
        if self.text_pivots == "after_image":
            if sig.text_after is None:
                raise ValueError("DARTScorer(text_pivots='after_image') needs the text_after signal")
            rows = rows & sig.text_after.to(rows.device)
        return rows

    def select(self, sig: SegmentSignals) -> Selection:
        # All segments at once, with no host sync: a segment's budget, pivot counts and per-pivot
        # take counts are (S,) tensors, every step runs on all rows with static shapes, and the
        # only Python loop is over the pivot slots (at most pivot_image + pivot_text).
        S, n = sig.mask.shape
        dev, mask = sig.mask.device, sig.mask
        feats = sig.normed_hidden if self.final_norm else sig.hidden
        if feats is None:
            raise ValueError(f"DARTScorer(final_norm={self.final_norm}) needs the "
                             f"{'normed_hidden' if self.final_norm else 'hidden'} signal")
        budget = sig.budget.to(dev).long()
        count = mask.sum(dim=1)
        rule = (budget > 0) & (budget < count)  # segments that select (others keep all or nothing)
        keep = mask & ((budget > 0) & (budget >= count)).unsqueeze(1)
        knorm = sig.keys.float().norm(p=self.key_norm, dim=-1).masked_fill(~mask, float("-inf"))
        # pivot slots: min(pivot_image, n) visual slots by decreasing key norm, then min(pivot_text,
        # T) text slots; a segment uses its first n_img visual and first n_txt text slots
        k_order = _order(knorm)
        n_img = budget.clamp(min=0, max=self.pivot_image) * rule  # (S,) min(pivot_image, k)
        n_txt = torch.zeros_like(n_img)
        z = F.unit_rows(feats)  # (S, n, D)
        v_order = k_order[:, :min(self.pivot_image, n)]
        slots = [z.gather(1, v_order.unsqueeze(-1).expand(-1, -1, z.shape[-1]))]
        ar_v = torch.arange(v_order.shape[1], device=dev)
        used, visit = [ar_v < n_img.unsqueeze(1)], [ar_v.expand(S, -1)]  # visit: the pivot's turn
        trows = self._text_rows(sig)
        if trows is not None:
            tfeats = sig.normed_text_hidden if self.final_norm else sig.text_hidden
            tnorm = sig.text_keys.float().norm(p=self.key_norm, dim=-1).masked_fill(~trows, float("-inf"))
            t_order = _order(tnorm)[:, :min(self.pivot_text, trows.shape[1])]
            n_txt = trows.sum(dim=1).clamp(max=self.pivot_text) * rule
            zt = F.unit_rows(tfeats)
            slots.append(zt.gather(1, t_order.unsqueeze(-1).expand(-1, -1, zt.shape[-1])))
            ar_t = torch.arange(t_order.shape[1], device=dev)
            used.append(ar_t < n_txt.unsqueeze(1))
            visit.append(n_img.unsqueeze(1) + ar_t)  # after the segment's visual pivots
        slots, used, visit = torch.cat(slots, dim=1), torch.cat(used, dim=1), torch.cat(visit, dim=1)
        pivots = n_img + n_txt  # (S,)
        keep |= _first(k_order, n_img)  # the visual pivots are kept (real slots: n_img < count)
        dup = torch.full((S, n), float("-inf"), dtype=torch.float32, device=dev)  # max cosine to any pivot
        if slots.shape[1]:
            sims = z @ slots.transpose(1, 2)  # (S, n, slots): cosine similarity to each pivot
            has = rule & (pivots > 0)
            best = sims.masked_fill(~used.unsqueeze(1), float("-inf")).max(dim=2).values
            dup = torch.where(has.unsqueeze(1), best, dup)
            # the budget beyond the visual pivots, split over the pivots in visiting order
            per = pivots.clamp(min=1)
            rest = (budget - n_img).clamp(min=0)
            base, extra = (rest // per).unsqueeze(1), (rest % per).unsqueeze(1)
            take = (base + (visit < extra).long()) * (used & has.unsqueeze(1))  # (S, slots)
            # slots in visiting order (a segment's unused slots take nothing); each pivot keeps its
            # least similar tokens among those neither pivots nor kept by an earlier pivot
            dissimilarity, taken = -sims, ~mask | keep
            for j in range(slots.shape[1]):
                pick = _first(_order(dissimilarity[:, :, j].masked_fill(taken, float("-inf"))), take[:, j])
                keep |= pick
                taken |= pick
        if self.pivot_image == 0:  # no pivot at all (no text after the image): key-norm ranking
            keep = torch.where((rule & (pivots == 0)).unsqueeze(1), topk_mask(knorm, mask, budget), keep)
        sig.diagnostics["erank"] = F.deferred_erank(sig.hidden if sig.hidden is not None else feats, keep)
        scores = torch.where(torch.isfinite(dup), -dup, torch.zeros_like(dup))
        return Selection(keep=keep, scores=masked_scores(scores, sig.mask))


@register_method(name="dart", family="diversity", paper="Wen et al. 2025 (arXiv:2502.11494)",
                 released_code="ZichenWen1/DART",
                 stages="layer K=2", needs_attention=False, text_guided=True,
                 options=("K", "pivot_image", "pivot_text", "key_norm", "text_pivots", "final_norm", "mode"))
def dart_plan(keep, K: int = 2, pivot_image: int = 4, pivot_text: int = 4, key_norm: int = 1,
              text_pivots: str = "after_image", final_norm: bool = True, mode: str = "select"):
    """DART preset: one stage at layer ``K`` (see :class:`DARTScorer` for the options)."""
    scorer = DARTScorer(pivot_image=pivot_image, pivot_text=pivot_text, key_norm=key_norm, text_pivots=text_pivots,
                        final_norm=final_norm)
    return [Stage(layer=K, scorer=scorer, keep=validate_budget(keep), mode=mode)]


@register_scorer
class AgileScorer(Scorer):
    """AgilePruner-style image-adaptive hybrid (Baek et al., "AgilePruner: An Empirical Study of
    Attention and Diversity for Adaptive Visual Token Pruning in Large Vision-Language Models",
    ICLR 2026, arXiv:2603.01236).

    The paper finds attention-based selection better on simple images (evidence concentrated:
    low attention entropy) and diversity-based selection better on complex ones (spread
    attention, high feature diversity). This minimal instantiation splits each image's budget
    by its normalised attention entropy h in [0, 1] (attention of the last prompt token at
    layer K-1, heads averaged): round((1 - h) * budget) tokens, clipped to
    [``min_attention_share``, ``max_attention_share``] of the budget, are the top tokens by
    attention; the rest are chosen by greedy max-min diversity (DivPrune's rule on hidden
    states) seeded with the attention picks.

    Not checked against code: cvsp-lab/AgilePruner@3df95a3 releases none ("coming soon"). Its
    project page describes the paper's own minimal instantiation differently: high-attention
    tokens first, each removing the candidates within a cosine-distance threshold
    tau_i = order_i * erank_input / erank_avg * 0.01 (capped), erank_avg a dataset statistic;
    this scorer's entropy split is vtoken's reading of the findings, not that rule.

    Signals: ``attn_last`` (S, H, n), ``hidden`` (S, n, D).
    Diagnostics: ``erank`` (S,) of the kept tokens, ``attn_entropy`` (S,) = h,
    ``attention_share`` (S,) = fraction of the budget chosen by attention.
    """

    name = "agile"
    needs = frozenset({"attn_last", "hidden"})
    text_guided: ClassVar[bool] = True

    def __init__(self, min_attention_share: float = 0.0, max_attention_share: float = 1.0):
        if not 0.0 <= min_attention_share <= max_attention_share <= 1.0:
            raise ValueError(
                f"need 0 <= min_attention_share <= max_attention_share <= 1; got {min_attention_share}, "
                f"{max_attention_share}"
            )
        self.min_attention_share = float(min_attention_share)
        self.max_attention_share = float(max_attention_share)

    def select(self, sig: SegmentSignals) -> Selection:
        att = F.head_mean(sig.attn_last)
        h = F.attention_entropy(att, sig.mask)
        share = (1.0 - h).clamp(self.min_attention_share, self.max_attention_share)
        budget = sig.budget.to(att.device)
        k_att = torch.minimum((share * budget.float()).round().long(), budget)
        seed = topk_mask(att, sig.mask, k_att)
        keep, _ = F.greedy_maxmin(sig.hidden, sig.mask, budget, seed=seed)
        sig.diagnostics["attn_entropy"] = h
        sig.diagnostics["attention_share"] = torch.where(budget > 0, k_att.float() / budget.clamp(min=1).float(),
                                                         torch.zeros_like(h))
        sig.diagnostics["erank"] = F.deferred_erank(sig.hidden, keep)
        return Selection(keep=keep, scores=masked_scores(att, sig.mask))


@register_method(name="agile", family="diversity", paper="Baek et al., ICLR 2026 (arXiv:2603.01236)",
                 released_code="none released (vtoken's reading; see docs/FIDELITY.md)",
                 stages="layer K=2", needs_attention=True, text_guided=True,
                 options=("K", "min_attention_share", "max_attention_share", "mode"))
def agile_plan(keep, K: int = 2, min_attention_share: float = 0.0, max_attention_share: float = 1.0,
               mode: str = "select"):
    """AgilePruner preset: one stage at layer ``K``."""
    scorer = AgileScorer(min_attention_share=min_attention_share, max_attention_share=max_attention_share)
    return [Stage(layer=K, scorer=scorer, keep=validate_budget(keep), mode=mode)]


__all__ = ["DivPruneScorer", "DARTScorer", "AgileScorer", "erank", "divprune_plan", "dart_plan", "agile_plan"]
