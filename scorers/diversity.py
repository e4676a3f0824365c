"""Diversity / effective-rank scorers: DivPrune, DART, AgilePruner (attention vs. diversity).

Each puts the effective rank (:func:`erank`) of the tokens it keeps into
``sig.diagnostics["erank"]`` (S,), and the normalised attention entropy into
``sig.diagnostics["attn_entropy"]`` (S,) when it reads attention.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vtoken.scorers import functional as F
from vtoken.scorers.base import Scorer, Selection, masked_scores, topk_mask
from vtoken.scorers.functional import erank
from vtoken.signals import SegmentSignals


def _top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries, ties towards the lower index (deterministic everywhere)."""
    return torch.sort(x, descending=True, stable=True).indices[:k]


def _rank_scores(order: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores for heatmaps from a pick order: earlier picks score higher, unpicked score 0."""
    n = mask.shape[1]
    s = torch.where(keep, (n - order).float(), torch.zeros(order.shape, device=order.device))
    return masked_scores(s, mask)


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
        sig.diagnostics["erank"] = F.erank_per_segment(sig.hidden, keep)
        return Selection(keep=keep, scores=_rank_scores(order, keep, sig.mask))


class DARTScorer(Scorer):
    """DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More", arXiv:2502.11494).

    At layer K (default 2): pivot tokens are the ``pivot_image`` (4) visual tokens and the
    ``pivot_text`` (4) text tokens with the largest norm of their key states at layer K-1.
    The visual pivots are kept; then, pivot by pivot, each pivot keeps the
    round(budget / pivots) not-yet-kept visual tokens LEAST similar to it (cosine similarity of
    hidden states) -- the tokens that duplicate no pivot. Needs no attention map.

    Deviations: the paper ranks pivots by the L1 norm of the keys. The keys a scorer receives
    carry RoPE, and a rotation changes L1 norms (not L2 norms): with L1 the pivots would depend on
    each token's absolute position, so a left-padded batch and the same sample alone could pick
    different pivots. vtoken therefore uses the rotation-invariant L2 norm by default
    (``key_norm=2``); ``key_norm=1`` gives the paper's L1 norm. The released code visits the
    pivots in Python-set order and may end a few tokens off the budget; vtoken visits image
    pivots (by key norm) then text pivots, and tops up round-robin over the pivots (one
    least-similar token each) until the budget is exact.
    Similarities use the hidden states entering layer K (the official code applies the final
    RMSNorm first; its per-dimension weights are not available to a pure scorer).

    Signals: ``hidden`` (S, n, D), ``keys`` (S, n, Dk), ``text_hidden`` (S, T, D),
    ``text_keys`` (S, T, Dk). Diagnostics: ``erank`` (S,) of the kept tokens.
    """

    name = "dart"
    needs = frozenset({"hidden", "keys", "text_hidden", "text_keys"})
    text_guided: ClassVar[bool] = True

    def __init__(self, pivot_image: int = 4, pivot_text: int = 4, key_norm: int = 2):
        if pivot_image < 0 or pivot_text < 0 or pivot_image + pivot_text == 0:
            raise ValueError(f"need at least one pivot; got pivot_image={pivot_image}, pivot_text={pivot_text}")
        if key_norm not in (1, 2):
            raise ValueError(f"key_norm must be 1 (the paper's L1) or 2 (RoPE-invariant L2); got {key_norm!r}")
        self.pivot_image = int(pivot_image)
        self.pivot_text = int(pivot_text)
        self.key_norm = int(key_norm)

    def select(self, sig: SegmentSignals) -> Selection:
        S, n = sig.mask.shape
        dev = sig.mask.device
        keep = torch.zeros_like(sig.mask)
        dup = torch.full((S, n), float("-inf"), device=dev)  # max cosine to any pivot (heatmap)
        knorm = sig.keys.float().norm(p=self.key_norm, dim=-1).masked_fill(~sig.mask, float("-inf"))
        has_text = sig.text_keys is not None and sig.text_keys.shape[1] > 0
        tmask = sig.text_mask if sig.text_mask is not None else (
            torch.ones(sig.text_keys.shape[:2], dtype=torch.bool, device=dev) if has_text else None)
        for s in range(S):
            k = int(sig.budget[s])
            count = int(sig.mask[s].sum())
            if k <= 0:
                continue
            if k >= count:
                keep[s] = sig.mask[s]
                continue
            hv = sig.hidden[s]
            n_img = min(self.pivot_image, k, count)
            img_piv = _top(knorm[s], n_img)
            pivots = [hv[i] for i in img_piv.tolist()]
            if has_text and self.pivot_text:
                tn = sig.text_keys[s].float().norm(p=self.key_norm, dim=-1).masked_fill(~tmask[s], float("-inf"))
                n_txt = min(self.pivot_text, int(tmask[s].sum()))
                if n_txt:
                    pivots += [sig.text_hidden[s, i] for i in _top(tn, n_txt).tolist()]
            if not pivots:  # no pivot at all: fall back to the key-norm ranking
                keep[s] = topk_mask(knorm[s:s + 1], sig.mask[s:s + 1], sig.budget[s:s + 1])[0]
                continue
            keep[s, img_piv] = True
            sims = torch.stack([F.cosine_to(hv, p) for p in pivots])  # (P, n)
            dup[s] = sims.max(dim=0).values
            per_pivot = max(1, round(k / len(pivots)))
            avail = sig.mask[s] & ~keep[s]
            kept = int(keep[s].sum())
            rounds = [per_pivot] + [1] * count  # first pass: per_pivot each, then one each until full
            for take in rounds:
                if kept >= k or not bool(avail.any()):
                    break
                for p in range(len(pivots)):
                    if kept >= k or not bool(avail.any()):
                        break
                    t = min(take, k - kept, int(avail.sum()))
                    cand = (-sims[p]).masked_fill(~avail, float("-inf"))
                    pick = _top(cand, t)
                    keep[s, pick] = True
                    avail[pick] = False
                    kept += t
        sig.diagnostics["erank"] = F.erank_per_segment(sig.hidden, keep)
        scores = torch.where(torch.isfinite(dup), -dup, torch.zeros_like(dup))
        return Selection(keep=keep, scores=masked_scores(scores, sig.mask))


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
        sig.diagnostics["erank"] = F.erank_per_segment(sig.hidden, keep)
        return Selection(keep=keep, scores=masked_scores(att, sig.mask))


__all__ = ["DivPruneScorer", "DARTScorer", "AgileScorer", "erank"]
