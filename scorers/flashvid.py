"""FlashVID's video token compression before the LLM -- dynamic segmentation, attention and
diversity-based token selection (ADTS) and tree-based spatiotemporal token merging (TSTM) --
and its in-LLM pruning; followed by its method preset (the plan builder registered with
:func:`vtoken.methods.register_method`).

Fan et al., "FlashVID: Efficient Video Large Language Models via Training-free Tree-based
Spatiotemporal Token Merging" (ICLR 2026, arXiv:2602.08024). Released code read:
github.com/Fanziyang-v/FlashVID at commit 038101ae8d5201cb275fe3584faa72994ed0465e (``flashvid/``
is unchanged up to the newest commit read, 1d37422): ``flashvid/utils.py`` (``flashvid_compression``,
``segment_compression``, ``segment``, ``additional_segment``, ``spatiotemporal_compression``,
``dpc_knn``, ``fastv_prune``), ``flashvid/token_selection.py`` (``attn_div_based_token_selection``,
``attn_div_v2_based_token_selection``), with the defaults of the ``flashvid()`` wrapper and of
``scripts/llava_ov.sh``: ``alpha`` = 0.7, ``temporal_threshold`` = 0.8, ``segment_threshold`` = 0.9,
``min_segment_num`` = 8, ``token_selection_method`` = ``attn_div_v2``, ``expansion`` = 1.25, in-LLM
pruning at ``pruning_layer`` = 20 keeping ``llm_retention_ratio`` = 0.3 (the Qwen2.5-VL script uses
``attn_div`` and ``min_segment_num`` = 4; the Qwen3-VL one also layer 28 and 0.1: options below).

The released rule on one video x (T frames, N tokens a frame, D features: the features entering
the LLM) with an attention a (T, N) and K tokens a frame (released ``ceil(N * ratio * expansion)``):

1. DySeg: g_f = mean of frame f's tokens; ``sim[f] = cos(g_f, g_{f+1})``; a cut after f where
   ``sim[f] < segment_threshold``; while fewer than ``min_segment_num`` segments, the cuts also
   take the lowest of the other similarities (``min_segment_num - segments`` of them, at most
   T - 1). The cuts split the frames into segments.
2. Per frame ``A = ceil(K * alpha)`` tokens by ADTS and ``S = K - A`` by TSTM.
3. ADTS (per frame, batched over the frames): ``dist[i, j] = (1 - cos(x_i, x_j)) * 1e6 a_j``
   (``attn_div_v2`` also multiplies by ``x_j . mean`` of the segment's frame means); the first
   token maximises the second smallest entry of its column; then, greedily, the token maximising
   its smallest distance to the tokens chosen so far (``attn_div``: chosen tokens are excluded;
   ``attn_div_v2``: not, so a token may be chosen twice and counts once).
4. TSTM (per segment of L > 1 frames): each non-ADTS token of frame f + 1 takes as parent its most
   similar non-ADTS token of frame f (cosine); it is merged into its parent where the cosine is
   above ``temporal_threshold``; if fewer than ``K * L`` tokens of the segment would then stay
   (ADTS tokens counted), the threshold drops to the ``(L N - K L)``-th largest of the segment's
   similarities (frame 0 counted as -1; at least ``-1 + 1e-6``). Following the parents from the
   last frame back gives redundancy trees; each tree root is one token (features: the sum over
   its tree divided by 1 + its number of direct children -- the released aggregation).
5. Spatial merging: ``ratio = S L / (roots of the segment)``; where ratio < 1 each frame's roots are
   clustered by DPC-kNN (``ceil(roots_f * ratio)`` centres, ``min(centres, 7)`` neighbours) and each
   cluster is one token at its centre's position. A one-frame segment clusters all its N tokens
   (ADTS ones included) instead.
6. Inside the LLM: at ``pruning_layer`` the visual tokens are ranked by the last token's attention
   in the layer before (heads averaged) and the top ``ceil(V * llm_retention_ratio)`` kept.

In vtoken: stage 1 (layer 0, :class:`FlashVIDScorer`, ``mode="merge"``) keeps the ADTS tokens and
the cluster centres (one-frame segments: their union, a centre that is an ADTS token kept once);
every tree member merges into its root's cluster centre and every other cluster member into its
centre (``Selection.merge_into``), so a kept token is the equal-weight mean of its cluster's trees.
Stage 2 (layer ``layers[0]``, :class:`~vtoken.scorers.attention.FastVScorer`, select) keeps
``ceil(keep * r)``; ``layers=()`` leaves it out.

Budget: vtoken's budget b of a T x N video is the tokens entering the LLM (released
``ratio * expansion``: ``keep = 0.25 * 1.25`` is the released ``retention_ratio=0.25``); the rule runs
with ``K = ceil(b / T)`` (at most N); its tokens rank first, the rest after them, each by the
attention a, and the top b are kept, so the count is exactly b (at ``b = T K`` the released set
wherever the released count is b; the released count exceeds ``T K`` by the rounding up of the
cluster counts). A dropped token whose merge target is not kept is dropped unmerged.

Deviations from the released code:

* Attention: the released ``a`` is the vision encoder's last-layer attention each patch receives
  (heads and queries averaged, merge groups pooled); vtoken has no encoder attention for video,
  so ``a`` is the softmax over the frame of each token's dot product with the frame's mean feature
  / sqrt(D) (the mean query's attention on the features entering the LLM; positive, as the
  calibration needs).
* Merge weights: the released tree token is the tree's sum over 1 + its direct children (the
  mean only for trees of depth <= 1) and the cluster token the mean of its trees' tokens; vtoken's
  merge is the equal-weight mean of every token of the cluster's trees. The clustering itself
  reads the released tree features, so the kept set is the released one.
* Positions: kept tokens keep their own positions (M-RoPE / 1-D); the released code re-sorts the
  kept tokens by index (the same order). A one-frame segment whose centre is an ADTS token has it
  once (the released code keeps the token and the cluster mean at the same position).
* DPC-kNN: no random noise on the densities (released ``1e-6 * rand``); equal densities are not
  "denser"; top-k and nearest-centre ties break towards the lower index; the extra DySeg cuts'
  ties break towards the earlier frame pair (released ``topk``: unspecified); distances and
  similarities in float64 (released float32).
* ``do_segment`` / ``complementary_segment`` are always on (as in every released script).
* ``K = N`` (a budget above ``T (N - 1)``): the released lower bound leaves no token to merge and its
  ``topk(k=0)`` raises; here no token is merged across frames (the clustering still runs).
* Host work: the greedy ADTS loop is batched over all frames of a video and has no host sync;
  DySeg, the trees and the clustering have data-dependent sizes and run per video on the CPU (as
  HoliTom's scorer).
* Video layouts: a video that is one segment with its (t, h, w) grid (Qwen2-VL, Qwen2.5-VL,
  LLaVA-OneVision) gets the whole rule. Qwen3-VL's prompt puts each temporal patch group in its
  own timestamped span, so vtoken's adapter makes each group a segment with its own budget
  (``sig.video`` says which segments are one video): the rule runs over the whole video (one frame
  per group, ``K`` from the groups' total budget) and each group keeps exactly its budget -- the
  rule's tokens of that group first, by attention; merges stay inside a group, so TSTM's tree
  members (always in a later group than their root) are dropped unmerged there. A video segment
  without a known grid, or already pruned, is one frame.
* Images: the released code compresses videos only; an image segment whose budget prunes it
  raises :class:`~vtoken.errors.PruningConfigError` ("not supported": use an image method, or
  ``keep=1.0``). Where the segment kind is unknown (hand-built signals) every segment is video.
"""

from __future__ import annotations

import math

import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import layer_indices, register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers.attention import FastVScorer
from vtoken.scorers.base import Scorer, Selection
from vtoken.scorers.holitom import dpc_knn, per_video, select_videos
from vtoken.signals import SegmentSignals

SELECTIONS = ("attn_div", "attn_div_v2")


def frame_attention(x: torch.Tensor) -> torch.Tensor:
    """The stand-in for the encoder attention: x (T, N, D) -> (T, N) float64, per frame the
    softmax of ``x_p . mean_f / sqrt(D)`` over its tokens."""
    xd = x.double()
    return torch.softmax((xd * xd.mean(1, keepdim=True)).sum(-1) / math.sqrt(x.shape[-1]), dim=-1)


def dyseg(x: torch.Tensor, threshold: float = 0.9, min_segments: int = 8) -> list:
    """DySeg cuts of a video x (T, N, D): the segment lengths (list of ints, summing to T)."""
    T = x.shape[0]
    g = torch.nn.functional.normalize(x.double().mean(1), dim=-1)
    sim = (g[:-1] * g[1:]).sum(-1)  # (T-1,)
    cut = sim < threshold
    need = min(min_segments - (int(cut.sum()) + 1), T - 1)
    if need > 0:
        filled = torch.where(cut, torch.ones_like(sim), sim)
        cut[torch.sort(filled, stable=True).indices[:need]] = True
    bounds = torch.nonzero(cut).flatten().tolist()
    edges = [0] + [c + 1 for c in bounds] + [T]
    return [b - a for a, b in zip(edges, edges[1:])]


def adts(x: torch.Tensor, attn: torch.Tensor, k: int, relevance=None, exclude: bool = True) -> torch.Tensor:
    """Attention and diversity-based token selection, batched over frames: x (B, N, D), attn
    (B, N), optional relevance (B, N) -> (B, N) bool, the chosen tokens (at most k a frame;
    fewer where ``exclude=False`` chose a token twice). One greedy step per token, no host sync."""
    B, N, _ = x.shape
    chosen = torch.zeros(B, N, dtype=torch.bool, device=x.device)
    if k <= 0 or N == 0:
        return chosen
    z = torch.nn.functional.normalize(x.double(), dim=-1)
    dist = (1.0 - z @ z.transpose(1, 2)) * (attn.double() * 1e6)[:, None, :]
    if relevance is not None:
        dist = dist * relevance.double()[:, None, :]
    first = torch.sort(dist, dim=1).values[:, min(1, N - 1), :].argmax(-1)  # (B,)
    rows = torch.arange(B, device=x.device)
    chosen[rows, first] = True
    nearest = dist[rows, first]  # (B, N): smallest distance of each token to the chosen ones
    last = first
    for _ in range(1, min(k, N) if exclude else k):
        score = nearest.masked_fill(chosen, -1.0) if exclude else nearest
        last = score.argmax(-1)
        chosen[rows, last] = True
        nearest = torch.minimum(nearest, dist[rows, last])
    return chosen


def tstm_trees(x: torch.Tensor, adts_mask: torch.Tensor, K: int, threshold: float) -> tuple:
    """TSTM on one segment x (L, N, D) with its ADTS tokens ``adts_mask`` (L, N): (root (L, N) long:
    the flat index of each non-ADTS token's tree root, -1 on ADTS tokens; features (L, N, D)
    float64: the released aggregation on the roots)."""
    L, N, D = x.shape
    xd = x.double()
    z = torch.nn.functional.normalize(xd, dim=-1)
    sim = z[1:] @ z[:-1].transpose(1, 2)  # (L-1, N, N): token n of frame f+1 vs token m of frame f
    sim = sim.masked_fill(adts_mask[1:, :, None] | adts_mask[:-1, None, :], -1.0)
    best, parent = sim.max(-1)
    best = torch.cat([torch.full((1, N), -1.0, dtype=best.dtype), best])
    parent = torch.cat([torch.zeros(1, N, dtype=torch.long), parent])
    merged = best > threshold
    lower = K * L
    if int((~merged).sum()) < lower:
        drop = L * N - lower
        soft = torch.sort(best.flatten(), descending=True).values[drop - 1] if drop > 0 else None
        merged = best > max(float(soft), -1.0 + 1e-6) if soft is not None else torch.zeros_like(merged)
    # features of the roots as the released code aggregates them (from the last frame back)
    acc, count = xd.clone(), torch.ones(L, N, dtype=torch.float64)
    for f in range(L - 1, 0, -1):
        m = merged[f]
        acc[f - 1].index_add_(0, parent[f][m], acc[f][m])
        count[f - 1].index_add_(0, parent[f][m], torch.ones(int(m.sum()), dtype=torch.float64))
    feats = acc / count[..., None]
    root = torch.arange(L * N).view(L, N).clone()
    for f in range(1, L):
        root[f] = torch.where(merged[f], root[f - 1][parent[f]], root[f])
    return torch.where(adts_mask, -1, root), feats


def flashvid_merge(x: torch.Tensor, K: int, alpha: float = 0.7, threshold: float = 0.8,
                   segment_threshold: float = 0.9, min_segments: int = 8, selection: str = "attn_div_v2",
                   attn=None) -> tuple:
    """FlashVID's pre-LLM rule on one video x (T, N, D) with K tokens a frame.

    Returns (keep (T, N) bool, target (T, N) long: for each merged token the flat index of the
    kept token it merges into, -1 elsewhere, attn (T, N) float64). ``attn`` defaults to
    :func:`frame_attention`.
    """
    T, N, D = x.shape
    xd = x.double()
    attn = frame_attention(x) if attn is None else attn.double()
    K = max(0, min(int(K), N))
    A = math.ceil(K * alpha)
    S = K - A
    lengths = dyseg(x, segment_threshold, min_segments)
    seg_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    relevance = None
    if selection == "attn_div_v2":  # x_j . mean of the segment's frame means
        frame_mean = xd.mean(1)
        seg_mean = torch.zeros(len(lengths), D, dtype=torch.float64).index_add_(0, seg_of, frame_mean)
        seg_mean = seg_mean / torch.tensor(lengths, dtype=torch.float64)[:, None]
        relevance = (xd * seg_mean[seg_of][:, None, :]).sum(-1)
    keep = adts(xd, attn, A, relevance, exclude=selection == "attn_div")
    target = torch.full((T, N), -1, dtype=torch.long)
    start = 0
    for L in lengths:
        end = start + L
        if S > 0 and threshold < 1.0:
            ad = keep[start:end].clone()
            if L > 1:
                root, feats = tstm_trees(xd[start:end], ad, K, threshold)
                is_root = (root == torch.arange(L * N).view(L, N)) & ~ad
            else:
                root, feats = torch.arange(N).view(1, N), xd[start:end]
                is_root = torch.ones(1, N, dtype=torch.bool)
            total = int(is_root.sum())
            ratio = S * L / total if total else 1.0
            centre = torch.arange(L * N)  # each root's centre (flat index into the segment)
            for f in range(L):
                roots = torch.nonzero(is_root[f]).flatten()
                c = math.ceil(roots.numel() * ratio)
                if ratio < 1.0 and c > 0:
                    cent, assign = dpc_knn(feats[f, roots], c, min(c, 7))
                    assign[cent] = torch.arange(cent.numel())
                    centre[f * N + roots] = f * N + roots[cent][assign]
                    keep[start + f, roots[cent]] = True
                else:
                    keep[start + f, roots] = True
            into = torch.where(root >= 0, centre[root.clamp(min=0)] + start * N, -1)
            own = torch.arange(start * N, end * N).view(L, N)
            target[start:end] = torch.where(keep[start:end] | (into == own), -1, into)
        start = end
    return keep, target, attn


@register_scorer
class FlashVIDScorer(Scorer):
    """FlashVID's pre-LLM stage (Fan et al., ICLR 2026, arXiv:2602.08024; released code
    Fanziyang-v/FlashVID@038101a): dynamic segmentation of the frames, attention and
    diversity-based token selection (calibrated max-min diversity) per frame, and redundancy
    trees across the frames of a segment, clustered (DPC-kNN) and merged. See the module
    docstring for the rule, the budget mapping and every deviation (attention from the hidden
    states; equal-weight merges; images refused).

    Signals: ``hidden`` (S, n, D), ``grid``, ``kind``, ``video`` -> Selection (exactly ``budget``
    tokens per segment; ``merge_into`` (S, n): run the stage with ``mode="merge"``).
    """

    name = "flashvid"
    needs = frozenset({"hidden"})

    def __init__(self, alpha: float = 0.7, tau: float = 0.8, segment_tau: float = 0.9, min_segments: int = 8,
                 selection: str = "attn_div_v2"):
        if not 0.0 <= alpha <= 1.0:
            raise PruningConfigError(f"flashvid alpha must lie in [0, 1]; got {alpha!r}")
        if selection not in SELECTIONS:
            raise PruningConfigError(f"flashvid selection must be one of {SELECTIONS}; got {selection!r}")
        if int(min_segments) < 1:
            raise PruningConfigError(f"flashvid min_segments must be >= 1; got {min_segments!r}")
        self.alpha, self.tau, self.segment_tau = float(alpha), float(tau), float(segment_tau)
        self.min_segments, self.selection = int(min_segments), selection

    def select(self, sig: SegmentSignals) -> Selection:
        if sig.hidden is None:
            raise PruningConfigError("flashvid needs the 'hidden' signal (the features entering the LLM)")

        def rule(x: torch.Tensor, budget: int) -> tuple:  # K = ceil(budget / T) tokens a frame
            return flashvid_merge(x, math.ceil(budget / x.shape[0]), self.alpha, self.tau, self.segment_tau,
                                  self.min_segments, self.selection)

        return select_videos(sig, per_video(rule), "flashvid compresses video tokens; pruning an image is not supported "
                                        "(FlashVID's released code compresses videos only)")


@register_method(name="flashvid", family="diversity", paper="Fan et al. 2026 (arXiv:2602.08024)",
                 stages="layer 0 (before the LLM, merge) and layer 20", needs_attention=True,
                 text_guided=True, options=("layers", "r", "alpha", "tau", "segment_tau", "min_segments",
                                            "selection"),
                 released_code="Fanziyang-v/FlashVID@038101a")
def flashvid_plan(keep, layers=(20,), r: float = 0.3, alpha: float = 0.7, tau: float = 0.8,
                  segment_tau: float = 0.9, min_segments: int = 8, selection: str = "attn_div_v2"):
    """FlashVID preset: the pre-LLM stage (:class:`FlashVIDScorer`, merge) keeping ``keep``, then
    FastV pruning at layer ``layers[0]`` (``pruning_layer``) keeping ``ceil(keep * r)``
    (``llm_retention_ratio``; last-token attention). ``layers=()``: no in-LLM pruning. The released
    ``retention_ratio`` rho with ``expansion`` 1.25 is ``keep = 1.25 * rho``."""
    keep = validate_budget(keep)
    scorer = FlashVIDScorer(alpha=alpha, tau=tau, segment_tau=segment_tau, min_segments=min_segments,
                            selection=selection)
    plan = [Stage(layer=0, scorer=scorer, keep=keep, mode="merge")]
    layers = layer_indices(layers, "flashvid layers") if layers else ()
    if len(layers) > 1 or (layers and layers[0] < 1):
        raise PruningConfigError(f"flashvid layers names at most one LLM layer >= 1 (pruning_layer); got {layers!r}")
    if layers:
        if not 0.0 < r <= 1.0:
            raise PruningConfigError(f"flashvid r (share kept inside the LLM) must lie in (0, 1]; got {r!r}")
        second = max(1, math.ceil(keep * r)) if isinstance(keep, int) else keep * r
        plan.append(Stage(layer=layers[0], scorer=FastVScorer(), keep=second))
    return plan


__all__ = ["FlashVIDScorer", "flashvid_plan", "flashvid_merge", "frame_attention", "dyseg", "adts", "tstm_trees"]
