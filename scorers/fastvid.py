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

On Qwen3-VL, whose prompt wraps each temporal patch group of a video in its own timestamped
span, vtoken's adapter makes each group a segment (t == 1), so the image rule applies there;
the temporal rule runs where a video is one segment (Qwen2-VL, Qwen2.5-VL).
"""

from __future__ import annotations

import math

import torch

from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers.base import Scorer, Selection, masked_scores
from vtoken.signals import SegmentSignals


def _top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries, ties towards the lower index."""
    return torch.sort(x, descending=True, stable=True).indices[:k]


def _runs(cuts: list, length: int) -> list:
    """Run lengths of ``length`` items cut after each index in ``cuts`` (sorted, unique)."""
    sizes, start = [], 0
    for c in cuts:
        sizes.append(c + 1 - start)
        start = c + 1
    sizes.append(length - start)
    return sizes


def dyseg(g: torch.Tensor, c: int, tau: float) -> list:
    """Segment sizes of DySeg from unit frame features g (T, D)."""
    T = g.shape[0]
    if T == 1:
        return [1]
    sim = (g[:-1] * g[1:]).sum(-1)
    low = torch.sort(sim, stable=True).indices[: max(c - 1, 0)].tolist()
    cuts = sorted(set(low) | set(torch.nonzero(sim < tau).flatten().tolist()))
    return _runs(cuts, T)


def frame_counts(g: torch.Tensor, size: int, retain: int, N: int, d: float, p: int, ignore: float) -> list:
    """(salient, context) per frame of one DySeg segment of ``size`` frames (unit features g)."""
    context = max(int(retain * d), 1)
    salient = max(retain - context, 0)
    if size == 1:
        return [(salient, context)]
    sim = (g[:-1] * g[1:]).sum(-1)
    sub = _runs(torch.nonzero(sim < ignore).flatten().tolist(), size)
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


def density_peaks(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (into x (M, D)) of the k density peaks of DPC-kNN (4 nearest, self included)."""
    M, D = x.shape
    if k <= 0 or M == 0:
        return torch.zeros(0, dtype=torch.long)
    dist = torch.cdist(x.double(), x.double()) / math.sqrt(D)
    near = torch.sort(dist, dim=-1).values[:, : min(4, M)]
    density = torch.exp(-(near ** 2).mean(-1))
    denser = density[None, :] > density[:, None]  # [i, j]: j denser than i
    delta = torch.where(denser, dist, dist.max().expand_as(dist)).min(-1).values
    return _top(delta * density, k)


def fastvid_keep(x: torch.Tensor, retain: list, c: int = 8, tau: float = 0.84, ignore: float = 0.95,
                 d: float = 0.4, p: int = 4) -> tuple:
    """FastVID on one video x (T, N, D) with per-frame retain counts: (kept mask (T, N) bool,
    salience (T, N) float)."""
    T, N, _ = x.shape
    xf = x.double()
    mean = xf.mean(1)
    g = torch.nn.functional.normalize(mean, dim=-1)
    salience = (xf * mean[:, None, :]).sum(-1)
    keep = torch.zeros(T, N, dtype=torch.bool)
    start = 0
    for size in dyseg(g, c, tau):
        counts = frame_counts(g[start:start + size], size, sum(retain[start:start + size]), N, d, p, ignore)
        for f, (ns, nc) in zip(range(start, start + size), counts):
            top = _top(salience[f], ns)
            keep[f, top] = True
            rest = torch.nonzero(~keep[f]).flatten()
            keep[f, rest[density_peaks(xf[f, rest], min(nc, rest.numel()))]] = True
        start += size
    return keep, salience


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
        keep = torch.zeros_like(sig.mask)
        scores = torch.zeros(sig.mask.shape, dtype=torch.float32)
        for s in range(sig.num_segments):
            slots = torch.nonzero(sig.mask[s]).flatten().cpu()
            n = slots.numel()
            if n == 0:
                continue
            grid = sig.grid[s] if sig.grid is not None else None
            index = sig.index[s, slots.to(sig.index.device)].cpu()
            if grid is not None and n == int(sig.original[s]) and grid[0] * grid[1] * grid[2] == n:
                T = int(grid[0])
                slot_of = torch.empty(n, dtype=torch.long)
                slot_of[index] = slots
            else:
                T, slot_of = 1, slots
            x = sig.hidden[s, slot_of.to(sig.hidden.device)].reshape(T, n // T, -1).cpu()
            b = min(int(sig.budget[s]), n)
            retain = [b // T + (1 if f < b % T else 0) for f in range(T)]
            chosen, salience = fastvid_keep(x, retain, self.c, self.tau, self.ignore, self.d, self.p)
            chosen, salience = chosen.flatten(), salience.flatten()
            # released set first, then the rest; by salience within each, ties to the lower index
            order = torch.sort(salience, descending=True, stable=True).indices
            order = order[torch.sort((~chosen[order]).long(), stable=True).indices]
            keep[s, slot_of[order[:b]].to(keep.device)] = True
            scores[s, slot_of[order]] = torch.arange(n, 0, -1, dtype=torch.float32)
        return Selection(keep=keep, scores=masked_scores(scores.to(sig.mask.device), sig.mask))


@register_method(name="fastvid", family="diversity", paper="Shen et al. 2025 (arXiv:2503.11187)",
                 stages="layer 0 (before the LLM)", needs_attention=False, text_guided=False,
                 options=("layer", "c", "tau", "ignore", "d", "p", "mode"),
                 released_code="LunarShen/FastVID@a40a109")
def fastvid_plan(keep, layer: int = 0, c: int = 8, tau: float = 0.84, ignore: float = 0.95, d: float = 0.4,
                 p: int = 4, mode: str = "select"):
    """FastVID preset (DySeg + STPrune): one stage at ``layer`` (default before the LLM)."""
    scorer = FastVIDScorer(c=c, tau=tau, ignore=ignore, d=d, p=p)
    return [Stage(layer=layer, scorer=scorer, keep=validate_budget(keep), mode=mode)]


__all__ = ["FastVIDScorer", "fastvid_plan", "fastvid_keep", "dyseg", "frame_counts", "density_peaks"]
