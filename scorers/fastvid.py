"""FastVID's dynamic temporal segmentation and density-based spatiotemporal pruning, as a video
scorer before the LLM.

Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models"
(arXiv:2503.11187); released code github.com/LunarShen/FastVID at a40a109, the Qwen2.5-VL
variant (fastvid_qwen25vl/.../qwenvlutils/modeling_qwen2_5_vl.py, the block after the video
embeddings are placed), whose defaults this scorer takes: ``c = 8``, ``tau = 0.84``,
``ignore = 0.95``, ``d = 0.4``, ``p = 4`` (``retention_ratio`` 0.27 becomes vtoken's budget).

The released rule on one video (T frames of N tokens, x the features entering the LLM):

1. DySeg: each frame's global feature is the mean of its tokens, L2-normalised; the cosine of
   adjacent frames' features; a cut after frame f for the ``c - 1`` lowest similarities and for
   every similarity below ``tau``; the cuts split the video into segments.
2. Per segment of L frames: ``retain = R * L`` tokens (R per frame), ``context = max(int(retain *
   d), 1)``, ``salient = retain - context``. A one-frame segment puts both on its frame. A longer
   segment is split again where adjacent similarity < ``ignore``; only the last frame of each of
   these V sub-segments keeps tokens: the salient count split evenly over them (remainder to the
   first), the context count split evenly over ``ceil(V / p)`` anchors, which are every p-th of
   the V frames counted from the last; an anchor takes ``min(share, N // 2)`` context tokens and
   ``min(salient share, N - context)`` salient ones, any other kept frame ``min(salient share, N)``.
3. Per kept frame: the salient tokens are the top of a salience score; the context tokens are
   the density peaks (DPC-kNN) of the frame's other tokens: distances ``cdist / sqrt(D)``, density
   ``exp(-mean of the 4 smallest squared distances)`` (the token itself included), delta the
   distance to the nearest denser token (the largest distance of the frame where none), score
   ``delta * density``, top ``context``.

vtoken's budget is per segment: ``R = keep // T`` and the first ``keep % T`` frames count one
more (so ``keep = T * int(N * 0.27)`` is the released call); tokens the rule above keeps rank first
(by salience), the rest after them (by salience), and the top ``keep`` are kept. At
``keep = T * R`` the kept set is the released set when the released caps (``N // 2``, ``N``) do not
bind, and otherwise the released set plus the most salient of the rest up to exactly ``keep``
(the released code then keeps fewer than ``T * R``).

Deviations from the released code:

* salience: the released salient tokens are the top of the vision encoder's last-block attention
  from the frame's mean query to each merged token's mean key; this scorer reads only ``hidden``,
  so salience is the dot product of each token with its frame's mean hidden state (the same
  mean-query form on the features entering the LLM);
* DTM (merging the pruned tokens of a segment into their most similar context token with weight
  ``beta``) is not done: mode "select" drops them; mode "merge" lets the runtime merge by cosine;
* the released density adds ``1e-6 * rand`` to break ties; here none (deterministic), equal
  densities are not "denser" than each other, and top-k ties break towards the lower position;
* fewer than ``c - 1`` frame pairs: all of them are cuts (the released ``topk`` would raise);
* the count is vtoken's budget (above); where the released caps keep fewer, the rest is filled by salience;
* image segments (t == 1) and segments whose grid is unknown or already pruned are one frame:
  the same salient + context rule on that frame, so images get FastVID's spatial pruning.

Cost: the whole batch in one call, with two host syncs whatever the number of segments, frames
or DySeg segments (the segments' counts and budgets; the adjacent-frame similarities, for DySeg's
integer cuts and per-frame counts); the top salience and the DPC-kNN of every kept frame of every
segment run as one padded, masked batch (float64 distances, (frames, N, N)).

On Qwen3-VL, whose prompt wraps each temporal patch group of a video in its own timestamped
span, vtoken's adapter makes each group a segment (t == 1), so the image rule applies there;
the temporal rule runs where a video is one segment (Qwen2-VL, Qwen2.5-VL).
"""

from __future__ import annotations

import math

import torch

from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers.base import (Scorer, Selection, dpc_knn_batch, frame_means, full_grid, lex_rank, masked_scores,
                                 position_slots, segment_counts, to_slots)
from vtoken.signals import SegmentSignals


def _runs(cuts: list, length: int) -> list:
    """Run lengths of ``length`` items cut after each index in ``cuts`` (sorted, unique)."""
    sizes, start = [], 0
    for c in cuts:
        sizes.append(c + 1 - start)
        start = c + 1
    sizes.append(length - start)
    return sizes


def dyseg(sim: list, c: int, tau: float) -> list:
    """Segment sizes of DySeg from the cosine similarities of adjacent unit frame features (a
    list of T - 1 floats, on the host)."""
    T = len(sim) + 1
    if T == 1:
        return [1]
    low = sorted(range(T - 1), key=lambda i: sim[i])[: max(c - 1, 0)]  # stable: ties to the earlier pair
    cuts = sorted(set(low) | {i for i, v in enumerate(sim) if v < tau})
    return _runs(cuts, T)


def frame_counts(sim: list, size: int, retain: int, N: int, d: float, p: int, ignore: float) -> list:
    """(salient, context) per frame of one DySeg segment of ``size`` frames (``sim``: its
    ``size - 1`` adjacent similarities, on the host)."""
    context = max(int(retain * d), 1)
    salient = max(retain - context, 0)
    if size == 1:
        return [(salient, context)]
    sub = _runs([i for i, v in enumerate(sim) if v < ignore], size)
    V = len(sub)
    sal = [salient // V + (1 if i < salient % V else 0) for i in range(V)]
    anchors = (V + p - 1) // p
    share = [context // anchors + (1 if i < context % anchors else 0) for i in range(anchors)]
    ctx = [min(share[i // p], N // 2) if i % p == 0 else 0 for i in range(V)][::-1]
    out = []
    for i in range(V):
        out += [(0, 0)] * (sub[i] - 1)
        out.append((min(sal[i], N), 0) if ctx[i] == 0 else (min(sal[i], N - ctx[i]), ctx[i]))
    return out


def fastvid_batch(x: torch.Tensor, real: torch.Tensor, shapes: list, budgets: list, c: int = 8, tau: float = 0.84,
                  ignore: float = 0.95, d: float = 0.4, p: int = 4) -> tuple:
    """FastVID over a batch of videos. x (B, M, D): each row's tokens frame-major (``shapes[b] =
    (T, N)``: T frames of N tokens, ``T * N`` real positions first, ``real`` (B, M) bool marks
    them), ``budgets`` B host ints (tokens kept per video, split over its frames: the first ``b %
    T`` frames one more) -> (released (B, M) bool, salience (B, M) float64): the tokens the rule
    keeps and each token's salience. One host sync (the adjacent-frame similarities, for DySeg's
    integer cuts and counts); the per-frame selection (top salience, then DPC-kNN on the frame's
    other tokens) runs batched over every kept frame of every video."""
    B, M, D = x.shape
    dev = x.device
    if B == 0 or M == 0:
        return torch.zeros((B, M), dtype=torch.bool, device=dev), torch.zeros((B, M), dtype=torch.float64, device=dev)
    Tm = max(t for t, _ in shapes)
    xf = x.double()
    per = torch.tensor([max(n, 1) for _, n in shapes], device=dev)
    frame, mean = frame_means(xf, real, per, Tm)
    salience = (xf * mean.gather(1, frame.unsqueeze(-1).expand(B, M, D))).sum(-1)
    g = torch.nn.functional.normalize(mean[:, :Tm], dim=-1)
    sims = (g[:, :-1] * g[:, 1:]).sum(-1).tolist() if Tm > 1 else [[] for _ in range(B)]  # the host sync
    rows = []  # (video, first position, N, salient, context) of every frame that keeps tokens
    for b, (T, N) in enumerate(shapes):
        if T * N == 0:
            continue
        k = min(budgets[b], T * N)
        retain = [k // T + (1 if f < k % T else 0) for f in range(T)]
        start = 0
        for size in dyseg(sims[b][: T - 1], c, tau):
            counts = frame_counts(sims[b][start:start + size - 1], size, sum(retain[start:start + size]), N, d, p,
                                  ignore)
            rows += [(b, f * N, N, ns, nc) for f, (ns, nc) in zip(range(start, start + size), counts) if ns + nc]
            start += size
    released = torch.zeros((B, M + 1), dtype=torch.bool, device=dev)
    if rows:
        video, first, n, ns, nc = torch.tensor(rows, dtype=torch.long, device=dev).unbind(1)
        Nm = max(r[2] for r in rows)
        col = torch.arange(Nm, device=dev)
        valid = col < n[:, None]
        pos = torch.where(valid, first[:, None] + col, 0)
        sal = torch.where(valid, salience[video[:, None], pos], -math.inf)
        top = valid & (lex_rank((sal, True)) < ns[:, None])
        chosen = top | dpc_knn_batch(xf[video[:, None], pos], valid & ~top, nc, torch.full_like(nc, 4))[0]
        released.index_put_((video[:, None].expand_as(pos), torch.where(valid, pos, M)), chosen)
    return released[:, :M], salience


@register_scorer
class FastVIDScorer(Scorer):
    """FastVID (Shen et al., arXiv:2503.11187; released code LunarShen/FastVID@a40a109, Qwen2.5-VL
    variant): dynamic temporal segmentation of the frames (DySeg), then per segment salient tokens
    plus density-peak context tokens on a few frames (STPrune). See the module docstring for the
    rule, the budget mapping and every deviation (salience from the hidden states, no DTM).

    Signals: ``hidden`` (S, n, D), ``grid`` -> Selection (exactly ``budget`` tokens per segment).
    """

    name = "fastvid"
    needs = frozenset({"hidden"})

    def __init__(self, c: int = 8, tau: float = 0.84, ignore: float = 0.95, d: float = 0.4, p: int = 4):
        self.c, self.tau, self.ignore, self.d, self.p = int(c), float(tau), float(ignore), float(d), int(p)

    def select(self, sig: SegmentSignals) -> Selection:
        mask = sig.mask
        dev = mask.device
        counts, budgets, original = segment_counts(sig)
        grids = [full_grid(sig, s, c, original[s]) if c else None for s, c in enumerate(counts)]
        shapes = [(g[0], c // g[0]) if g else (1, c) for g, c in zip(grids, counts)]  # (frames, tokens a frame)
        slot, real = position_slots(sig, counts, [g is not None for g in grids])
        x = sig.hidden.gather(1, slot.unsqueeze(-1).expand(*slot.shape, sig.hidden.shape[-1]))
        released, salience = fastvid_batch(x, real, shapes, budgets, self.c, self.tau, self.ignore, self.d, self.p)
        # released set first, then the rest, then padding; by salience within each, ties to the
        # lower position
        rank = lex_rank(((~released).long() + 2 * (~real).long(), False), (salience, True))
        count = torch.tensor(counts, device=dev)
        keep = real & (rank < torch.tensor(budgets, device=dev).clamp(max=count)[:, None])
        scores = to_slots((count[:, None] - rank).float(), slot, real)
        return Selection(keep=to_slots(keep, slot, real), scores=masked_scores(scores, mask))


@register_method(name="fastvid", family="diversity", paper="Shen et al. 2025 (arXiv:2503.11187)",
                 stages="layer 0 (before the LLM)", needs_attention=False, text_guided=False,
                 options=("layer", "c", "tau", "ignore", "d", "p", "mode"),
                 released_code="LunarShen/FastVID@a40a109")
def fastvid_plan(keep, layer: int = 0, c: int = 8, tau: float = 0.84, ignore: float = 0.95, d: float = 0.4,
                 p: int = 4, mode: str = "select"):
    """FastVID preset (DySeg + STPrune): one stage at ``layer`` (default before the LLM)."""
    scorer = FastVIDScorer(c=c, tau=tau, ignore=ignore, d=d, p=p)
    return [Stage(layer=layer, scorer=scorer, keep=validate_budget(keep), mode=mode)]


__all__ = ["FastVIDScorer", "fastvid_plan", "fastvid_batch", "dyseg", "frame_counts"]
