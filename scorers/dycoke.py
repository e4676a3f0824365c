"""DyCoke's temporal token merging (TTM) as a video scorer before the LLM.

Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models",
CVPR 2025 (arXiv:2411.15024); released code github.com/KD-TAO/DyCoke at dd74634
(``dycole_ttm`` in llava/model/llava_arch.py).

The released rule, on one video's projected features (frames x tokens per frame, the features
entering the LLM), with ``k`` its merging ratio (``dycoke_k``, 0.7 in the README's evaluation):

* pairs: for every even frame i (i + 1 < T), each token of frame i + 1 gets the cosine
  similarity to the token at the same position of frame i; frame i + 1 keeps its
  ``int((1 - k) * N)`` least similar tokens (N tokens per frame); frame i is kept whole;
* windows of 4: for i = 0, 4, 8, ... with i < T - 4 (so the last window of a multiple-of-4 count
  is left out), frame i + 2 is pruned the same way against frame i (its pair pass, where it was
  the kept frame, is overridden); frame i + 3 stays pruned against the *whole* frame i + 2;
* every other frame (the "anchors": 0, 4, 8, ... and the frame i + 2 of a window the second loop
  skips) is kept whole.

vtoken's budget is per segment, so the rule becomes a ranking whose top ``keep`` tokens are the
released set whenever ``keep`` equals the released count (see :func:`dycoke_released_count`):
anchors first; then the tokens of the pruned frames by their rank within their own frame (0 =
least similar to its reference token), so every pruned frame keeps the same number of tokens as
released; equal ranks are ordered by similarity (lower first), then frame, then position.

Deviations from the released code (each needed to give any per-segment budget, or documented
choices where the released code has no rule):

* the count is vtoken's budget, not ``k``: ``keep = dycoke_released_count(t, h*w, k)`` gives
  the released set; other budgets keep a prefix of the ranking above;
* a budget below the anchors' count cuts anchors: the first frame ranks above the other anchors,
  each later anchor's tokens are ranked like a pruned frame against the previous anchor (a
  vtoken extension; the released code never prunes an anchor), and a budget below one frame
  keeps the first frame's tokens in raster order;
* an odd frame count: the released code drops the last (unpaired) frame altogether; here its
  tokens rank below every other token (by similarity to the frame before it), so they are kept
  only when the budget exceeds the rest -- identical at the released count;
* T <= 4: the released second loop is empty and ``torch.stack`` of an empty list raises; here the
  pairs alone apply;
* tie-breaking: the released ``topk(largest=False)`` leaves ties to the backend; here equal
  similarities break towards the lower position (stable sort); the kept tokens stay in their
  original order (the released code concatenates a frame's kept tokens in similarity order);
* similarities in float32 (the released code computes them in the model's dtype);
* only TTM: DyCoke's second stage (dynamic KV-cache pruning at decode time, layer 3, ``p``) is
  not implemented -- vtoken's stages prune the prefill, not the cache per decoding step;
* image segments (t == 1), segments whose grid is unknown, and segments already pruned (count !=
  t*h*w) have no frames to compare: they keep a spatially even sub-grid of ``keep`` tokens
  (the ``uniform`` baseline's rule), so images in a mixed prompt still meet the budget.

Cost: the whole batch in one call with one host sync (the segments' counts and budgets), whatever
the number of segments or frames: the similarities and the ranking of every video run as one
padded batch (positions frame-major, masks for padding), the image rule as one scatter.

On Qwen3-VL, whose prompt wraps each temporal patch group of a video in its own timestamped
span, vtoken's adapter makes each group a segment (t == 1), so the image rule applies there;
the temporal rule runs where a video is one segment (Qwen2-VL, Qwen2.5-VL).
"""

from __future__ import annotations

import torch

from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers.base import (Scorer, Selection, full_grid, lex_rank, masked_scores, position_slots,
                                 segment_counts, to_slots)
from vtoken.scorers.baselines import uniform_keep
from vtoken.signals import SegmentSignals

#: ranking levels (higher is kept first)
_FIRST, _ANCHOR, _PRUNED, _DROPPED = 3, 2, 1, 0


def ttm_references(t: int) -> list:
    """Per frame: ``(level, reference frame or None)`` of the released TTM for ``t`` frames
    (levels: first frame, other anchors, pruned frames, the released code's dropped last frame)."""
    ref: list = [None] * t
    level = [_ANCHOR] * t
    for i in range(0, t - 1, 2):
        ref[i + 1], level[i + 1] = i, _PRUNED
    for i in range(0, t - 4, 4):
        ref[i + 2], level[i + 2] = i, _PRUNED
    if t % 2 == 1 and t > 1:
        ref[t - 1], level[t - 1] = t - 2, _DROPPED
    previous = None
    for f in range(t):
        if level[f] == _ANCHOR:
            if previous is None:
                level[f] = _FIRST
            else:
                ref[f] = previous
            previous = f
    return list(zip(level, ref))


def dycoke_released_count(t: int, per_frame: int, k: float = 0.7) -> int:
    """The number of tokens the released TTM keeps of a ``t``-frame video with ``per_frame``
    tokens a frame at merging ratio ``k`` (pass it as ``keep`` to get the released set)."""
    m = int((1 - k) * per_frame)
    out = 0
    for level, _ in ttm_references(t):
        out += per_frame if level in (_FIRST, _ANCHOR) else (m if level == _PRUNED else 0)
    return out


def ttm_rank(x: torch.Tensor, real: torch.Tensor, shapes: list) -> torch.Tensor:
    """The TTM ranking of B videos at once: x (B, M, D) each row's tokens frame-major, ``shapes[b]
    = (T, N)`` (``T * N`` real positions first, ``real`` (B, M) marks them) -> (B, M) long, each
    token's rank (0 = the first to keep; padding last): level desc (first frame, other anchors,
    pruned frames, the dropped last frame), then the rank of the token's similarity to the same
    position of its reference frame within its frame (ascending; ties to the lower position), the
    similarity, the frame, the position. Tensor ops only (no host sync)."""
    B, M, _ = x.shape
    dev = x.device
    Tm = max(t for t, _ in shapes)
    # per frame: its level and reference frame (-1: none); padding positions: frame Tm, level -1
    table = []
    for T, N in shapes:
        refs = ttm_references(T)
        pad = [-1] * (Tm - T + 1)
        table.append([lv for lv, _ in refs] + pad + [-1 if r is None else r for _, r in refs] + pad + [max(N, 1)])
    table = torch.tensor(table, dtype=torch.long, device=dev)
    level, ref, per = table[:, : Tm + 1], table[:, Tm + 1: 2 * Tm + 2], table[:, -1:]
    p = torch.arange(M, device=dev).expand(B, M)
    frame = torch.where(real, p // per, Tm)
    within = p % per
    r = ref.gather(1, frame)
    has = real & (r >= 0)
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    other = z.gather(1, torch.where(has, r * per + within, 0).unsqueeze(-1).expand_as(z))
    sim = torch.where(has, (z * other).sum(-1), torch.zeros((), dtype=torch.float32, device=dev))
    # rank of the similarity within the frame (frames without a reference: the position)
    in_frame = lex_rank((frame, False), (sim, False)) - frame * per
    return lex_rank((level.gather(1, frame), True), (in_frame, False), (sim, False))


@register_scorer
class DyCokeScorer(Scorer):
    """DyCoke's temporal token merging (Tao et al., CVPR 2025, arXiv:2411.15024; released code
    KD-TAO/DyCoke@dd74634): in each window of 4 frames, tokens of later frames that repeat the
    token at the same position of an earlier frame (cosine similarity of the hidden states
    entering the LLM) are pruned first; the first frame of each window is kept whole. See the
    module docstring for the rule, the budget mapping and every deviation.

    Signals: ``hidden`` (S, n, D), ``grid`` -> Selection (exactly ``budget`` tokens per segment).
    Image segments (t == 1) keep an even sub-grid (the ``uniform`` rule).
    """

    name = "dycoke"
    needs = frozenset({"hidden"})

    def select(self, sig: SegmentSignals) -> Selection:
        mask = sig.mask
        dev = mask.device
        counts, budgets, original = segment_counts(sig)
        grids = [full_grid(sig, s, c, original[s]) for s, c in enumerate(counts)]
        videos = [s for s, g in enumerate(grids) if g is not None and g[0] >= 2]
        keep = uniform_keep(sig, counts, budgets, grids, [s for s, g in enumerate(grids) if not (g and g[0] >= 2)])
        scores = keep.float()
        if videos:
            rows = torch.tensor(videos, device=dev)
            slot, real = position_slots(sig, counts, [g is not None for g in grids])
            slot, real = slot[rows], real[rows]
            x = sig.hidden[rows].gather(1, slot.unsqueeze(-1).expand(*slot.shape, sig.hidden.shape[-1]))
            rank = ttm_rank(x, real, [(grids[s][0], counts[s] // grids[s][0]) for s in videos])
            count = torch.tensor([counts[s] for s in videos], device=dev)[:, None]
            k = torch.tensor([budgets[s] for s in videos], device=dev)[:, None].clamp(max=count)
            keep[rows] = to_slots(real & (rank < k), slot, real)
            scores[rows] = to_slots((count - rank).float(), slot, real)
        return Selection(keep=keep, scores=masked_scores(scores, mask))


@register_method(name="dycoke", family="diversity", paper="Tao et al., CVPR 2025 (arXiv:2411.15024)",
                 stages="layer 0 (before the LLM)", needs_attention=False, text_guided=False,
                 options=("layer", "mode"), released_code="KD-TAO/DyCoke@dd74634")
def dycoke_plan(keep, layer: int = 0, mode: str = "select"):
    """DyCoke preset (its first stage, TTM): one stage at ``layer`` (default before the LLM)."""
    return [Stage(layer=layer, scorer=DyCokeScorer(), keep=validate_budget(keep), mode=mode)]


__all__ = ["DyCokeScorer", "dycoke_plan", "dycoke_released_count", "ttm_rank", "ttm_references"]
