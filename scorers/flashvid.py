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
* Host work: the whole batch in one call with two host syncs (the segments' counts; the adjacent
  frames' similarities, for DySeg), whatever the number of videos, frames or segments: the greedy
  ADTS loop runs over every frame of every video (per-frame step limits as masks), TSTM over every
  segment (padded to the longest), the clustering over every frame, all on the device.
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
from vtoken.scorers.base import Scorer, Selection, dpc_knn_batch
from vtoken.scorers.holitom import select_videos
from vtoken.signals import SegmentSignals

SELECTIONS = ("attn_div", "attn_div_v2")


def dyseg(sim: list, threshold: float = 0.9, min_segments: int = 8) -> list:
    """DySeg cuts from the cosine similarities of adjacent frames' mean features (T - 1 host
    floats): the segment lengths (list of ints, summing to T)."""
    T = len(sim) + 1
    cut = [v < threshold for v in sim]
    need = min(min_segments - (sum(cut) + 1), T - 1)
    if need > 0:
        filled = [1.0 if c else v for c, v in zip(cut, sim)]
        for i in sorted(range(T - 1), key=lambda i: filled[i])[:need]:  # stable: ties to the earlier pair
            cut[i] = True
    edges = [0] + [i + 1 for i, c in enumerate(cut) if c] + [T]
    return [b - a for a, b in zip(edges, edges[1:])]


def adts(x: torch.Tensor, attn: torch.Tensor, k, relevance=None, exclude: bool = True, valid=None,
         steps=None) -> torch.Tensor:
    """Attention and diversity-based token selection, batched over frames: x (B, N, D), attn
    (B, N), k an int or a (B,) tensor with ``steps`` its host maximum, optional relevance (B, N)
    and ``valid`` (B, N) (real tokens) -> (B, N) bool, the chosen tokens (at most k a frame; fewer
    where ``exclude=False`` chose a token twice). One greedy step per token, no host sync."""
    B, N, _ = x.shape
    dev = x.device
    chosen = torch.zeros(B, N, dtype=torch.bool, device=dev)
    if not torch.is_tensor(k):
        k, steps = torch.full((B,), int(k), dtype=torch.long, device=dev), int(k)
    if steps <= 0 or N == 0:
        return chosen
    valid = torch.ones(B, N, dtype=torch.bool, device=dev) if valid is None else valid
    size = valid.sum(1)
    z = torch.nn.functional.normalize(x.double(), dim=-1)
    dist = (1.0 - z @ z.transpose(1, 2)) * (attn.double() * 1e6)[:, None, :]
    if relevance is not None:
        dist = dist * relevance.double()[:, None, :]
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
    second = torch.sort(torch.where(valid[:, :, None], dist, inf), dim=1).values  # per column, over rows
    second = second.gather(1, (size - 1).clamp(min=0, max=1).view(B, 1, 1).expand(B, 1, N))[:, 0]
    first = torch.where(valid, second, -inf).argmax(-1)  # (B,)
    rows = torch.arange(B, device=dev)
    on = (k > 0) & (size > 0)
    chosen[rows, first] = on
    nearest = dist[rows, first]  # (B, N): smallest distance of each token to the chosen ones
    limit = torch.minimum(k, size) if exclude else k
    for step in range(1, steps):
        score = nearest.masked_fill(chosen, -1.0) if exclude else nearest
        last = torch.where(valid, score, -inf).argmax(-1)
        act = on & (step < limit)
        chosen[rows, last] |= act
        nearest = torch.where(act[:, None], torch.minimum(nearest, dist[rows, last]), nearest)
    return chosen


def tstm_trees(x: torch.Tensor, adts_mask: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor,
               K: torch.Tensor, threshold: float, drop: list) -> tuple:
    """TSTM on B segments at once: x (B, L, N, D) (frames past ``lengths[b]``, tokens outside
    ``valid`` (B, L, N) are padding), ADTS tokens ``adts_mask`` (B, L, N), K (B,) tokens a frame,
    ``drop`` B host ints (``L N - K L``). -> (root (B, L, N) long: the flat index (f * N + p on
    this padded grid) of each non-ADTS token's tree root, -1 on ADTS tokens; features (B, L, N, D)
    float64: the released aggregation on the roots). No host sync."""
    B, L, N, D = x.shape
    dev = x.device
    xd = x.double()
    z = torch.nn.functional.normalize(xd, dim=-1)
    sim = z[:, 1:] @ z[:, :-1].transpose(2, 3)  # (B, L-1, N, N): token n of frame f+1 vs m of frame f
    sim = sim.masked_fill(adts_mask[:, 1:, :, None] | adts_mask[:, :-1, None, :], -1.0)
    sim = sim.masked_fill(~valid[:, :-1, None, :], -math.inf)
    best, parent = sim.max(-1)
    best = torch.cat([torch.full((B, 1, N), -1.0, dtype=best.dtype, device=dev), best], 1)
    parent = torch.cat([torch.zeros((B, 1, N), dtype=torch.long, device=dev), parent], 1)
    merged = (best > threshold) & valid
    # fewer than K L tokens would stay: the threshold drops to the drop-th largest similarity
    need = ((~merged & valid).sum((1, 2)) < K * lengths)
    ranked = torch.sort(torch.where(valid, best, -math.inf).flatten(1), dim=1, descending=True).values
    d = torch.tensor(drop, dtype=torch.long, device=dev)
    soft = ranked.gather(1, (d - 1).clamp(min=0)[:, None]).clamp(min=-1.0 + 1e-6)
    lowered = (best > soft[:, :, None]) & valid & (d > 0)[:, None, None]
    merged = torch.where(need[:, None, None], lowered, merged)
    # features of the roots as the released code aggregates them (from the last frame back)
    acc = xd.clone()
    count = torch.ones((B, L, N), dtype=torch.float64, device=dev)
    for f in range(L - 1, 0, -1):
        m = merged[:, f]
        acc[:, f - 1].scatter_add_(1, parent[:, f, :, None].expand(B, N, D), acc[:, f] * m[..., None])
        count[:, f - 1].scatter_add_(1, parent[:, f], m.double())
    feats = acc / count[..., None]
    root = torch.arange(L * N, device=dev).view(1, L, N).repeat(B, 1, 1)
    for f in range(1, L):
        root[:, f] = torch.where(merged[:, f], root[:, f - 1].gather(1, parent[:, f]), root[:, f])
    return torch.where(adts_mask, -1, root), feats


def flashvid_batch(x: torch.Tensor, real: torch.Tensor, shapes: list, Ks: list, alpha: float = 0.7,
                   threshold: float = 0.8, segment_threshold: float = 0.9, min_segments: int = 8,
                   selection: str = "attn_div_v2") -> tuple:
    """FlashVID's pre-LLM rule on V videos at once: x (V, M, D) each row's tokens frame-major,
    ``shapes[v] = (T, N)`` (``real`` (V, M) marks the ``T N`` real positions), ``Ks`` V host ints
    (tokens a frame). Returns (keep (V, M) bool, target (V, M) long: for each merged token the
    position of the kept token it merges into, -1 elsewhere, attn (V, M) float64). One host sync
    (the adjacent frames' similarities, for DySeg); ADTS runs over every frame of every video, TSTM
    over every segment, the clustering over every frame, as padded, masked batches."""
    V, M, D = x.shape
    dev = x.device
    Tm, Nm = max(t for t, _ in shapes), max(max(n for _, n in shapes), 1)
    Tv = torch.tensor([t for t, _ in shapes], device=dev)
    Nv = torch.tensor([max(n, 1) for _, n in shapes], device=dev)
    fi, pi = torch.arange(Tm, device=dev), torch.arange(Nm, device=dev)
    gval = (fi[None, :, None] < Tv[:, None, None]) & (pi[None, None, :] < Nv[:, None, None])  # (V, Tm, Nm)
    gpos = torch.where(gval, fi[None, :, None] * Nv[:, None, None] + pi, 0)
    vi = torch.arange(V, device=dev)[:, None, None]
    xg = torch.where(gval[..., None], x.double()[vi, gpos], 0.0)  # (V, Tm, Nm, D)
    frame_mean = xg.sum(2) / Nv[:, None, None]  # (V, Tm, D)
    logits = torch.where(gval, (xg * frame_mean[:, :, None]).sum(-1) / math.sqrt(D), -math.inf)
    attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # (V, Tm, Nm)
    g = torch.nn.functional.normalize(frame_mean, dim=-1)
    sims = (g[:, :-1] * g[:, 1:]).sum(-1).tolist() if Tm > 1 else [[] for _ in range(V)]  # the host sync
    # the host: segments and integer counts
    segs, seg_of = [], [[0] * Tm for _ in range(V)]  # (video, start, L); each frame's segment
    for v, (T, N) in enumerate(shapes):
        start = 0
        for L in dyseg(sims[v][: T - 1], segment_threshold, min_segments):
            for f in range(start, start + L):
                seg_of[v][f] = len(segs)
            segs.append((v, start, L))
            start += L
    K = [max(0, min(int(k), n)) for k, (_, n) in zip(Ks, shapes)]
    A = [math.ceil(k * alpha) for k in K]
    so = torch.tensor(seg_of, dtype=torch.long, device=dev)  # (V, Tm)
    relevance = None
    if selection == "attn_div_v2":  # x_j . mean of the segment's frame means
        sums = torch.zeros((len(segs), D), dtype=torch.float64, device=dev)
        fval = fi[None, :] < Tv[:, None]
        sums.index_add_(0, so[fval], frame_mean[fval])
        seg_mean = sums / torch.tensor([L for _, _, L in segs], dtype=torch.float64, device=dev)[:, None]
        relevance = (xg * seg_mean[so][:, :, None, :]).sum(-1)
    kf = torch.tensor(A, dtype=torch.long, device=dev)[:, None].expand(V, Tm).reshape(-1)
    flat = (V * Tm, Nm)
    rel = None if relevance is None else relevance.reshape(flat)
    keep = adts(xg.reshape(V * Tm, Nm, D), attn.reshape(flat), kf, rel,
                exclude=selection == "attn_div", valid=gval.reshape(flat), steps=max(A, default=0)).view(V, Tm, Nm)
    keep &= gval
    target = torch.full((V, Tm, Nm), -1, dtype=torch.long, device=dev)
    work = [i for i, (v, _, _) in enumerate(segs) if K[v] - A[v] > 0 and threshold < 1.0]
    if work:
        Lm = max(segs[i][2] for i in work)
        sv, ss, sl = (torch.tensor(c, dtype=torch.long, device=dev) for c in zip(*[segs[i] for i in work]))
        B = len(work)
        lf = torch.arange(Lm, device=dev)
        fr = (ss[:, None] + lf).clamp(max=Tm - 1)  # (B, Lm) the video frame of each segment frame
        sval = gval[sv[:, None], fr] & (lf < sl[:, None])[:, :, None]  # (B, Lm, Nm)
        xs = xg[sv[:, None], fr]
        ad = keep[sv[:, None], fr] & sval
        Kt = torch.tensor([K[segs[i][0]] for i in work], dtype=torch.long, device=dev)
        St = torch.tensor([K[segs[i][0]] - A[segs[i][0]] for i in work], dtype=torch.long, device=dev)
        drop = [segs[i][2] * shapes[segs[i][0]][1] - K[segs[i][0]] * segs[i][2] for i in work]
        root, feats = tstm_trees(xs, ad, sval, sl, Kt, threshold, drop)
        own = torch.arange(Lm * Nm, device=dev).view(1, Lm, Nm)
        single = (sl == 1)[:, None, None]
        root = torch.where(single, own, root)  # a one-frame segment clusters all its tokens
        feats = torch.where(single[..., None], xs, feats)
        is_root = torch.where(single, sval, (root == own) & ~ad & sval)
        total = is_root.sum((1, 2))
        ratio = torch.where(total > 0, (St * sl).double() / total.clamp(min=1), 1.0)  # (B,)
        roots_f = is_root.sum(2)  # (B, Lm)
        c = torch.ceil(roots_f * ratio[:, None]).long()
        cluster = (ratio < 1.0)[:, None] & (c > 0)
        cent, near = dpc_knn_batch(feats.reshape(B * Lm, Nm, D), (is_root & cluster[..., None]).reshape(B * Lm, Nm),
                                   c.reshape(-1), c.clamp(max=7).reshape(-1), exact=True)
        cent, near = cent.view(B, Lm, Nm), near.view(B, Lm, Nm)
        centre = torch.where(cluster[..., None] & is_root & ~cent, lf[None, :, None] * Nm + near, own)
        kept = torch.where(cluster[..., None], cent, is_root)
        # each token's root's centre, as a video position; merged where it is neither kept nor its own
        into = centre.flatten(1).gather(1, root.clamp(min=0).flatten(1)).view(B, Lm, Nm)
        into_pos = (ss[:, None, None] + into // Nm) * Nv[sv][:, None, None] + into % Nm
        own_pos = (ss[:, None, None] + lf[None, :, None]) * Nv[sv][:, None, None] + pi
        kk = keep[sv[:, None], fr] | kept
        tg = torch.where((root >= 0) & sval & ~kk & (into_pos != own_pos), into_pos, -1)
        fr_w = torch.where(lf[None, :] < sl[:, None], fr, Tm)  # padding frames -> a dump frame
        keep = torch.cat([keep, keep.new_zeros((V, 1, Nm))], 1)
        target = torch.cat([target, target.new_full((V, 1, Nm), -1)], 1)
        keep[sv[:, None], fr_w] = torch.where(sval, kk, keep[sv[:, None], fr_w])
        target[sv[:, None], fr_w] = torch.where(sval, tg, target[sv[:, None], fr_w])
        keep, target = keep[:, :Tm], target[:, :Tm]
    # back to positions
    out_keep = torch.zeros((V, M + 1), dtype=torch.bool, device=dev)
    out_target = torch.full((V, M + 1), -1, dtype=torch.long, device=dev)
    out_attn = torch.zeros((V, M + 1), dtype=torch.float64, device=dev)
    at = torch.where(gval, gpos, M).flatten(1)
    out_keep.scatter_(1, at, keep.flatten(1))
    out_target.scatter_(1, at, target.flatten(1))
    out_attn.scatter_(1, at, attn.flatten(1))
    return out_keep[:, :M], out_target[:, :M], out_attn[:, :M]


def flashvid_merge(x: torch.Tensor, K: int, alpha: float = 0.7, threshold: float = 0.8,
                   segment_threshold: float = 0.9, min_segments: int = 8, selection: str = "attn_div_v2") -> tuple:
    """FlashVID's pre-LLM rule on one video x (T, N, D) with K tokens a frame
    (:func:`flashvid_batch` with V = 1): (keep (T, N) bool, target (T, N) long flat index or -1,
    attn (T, N) float64)."""
    T, N, D = x.shape
    real = torch.ones((1, T * N), dtype=torch.bool, device=x.device)
    out = flashvid_batch(x.reshape(1, T * N, D), real, [(T, N)], [K], alpha, threshold, segment_threshold,
                         min_segments, selection)
    return tuple(o.view(T, N) for o in out)


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

        def rule(x: torch.Tensor, real: torch.Tensor, shapes: list, budgets: list) -> tuple:
            Ks = [math.ceil(b / T) for (T, _), b in zip(shapes, budgets)]  # K = ceil(budget / T) tokens a frame
            return flashvid_batch(x, real, shapes, Ks, self.alpha, self.tau, self.segment_tau, self.min_segments,
                                  self.selection)

        return select_videos(sig, rule, "flashvid compresses video tokens; pruning an image is not supported "
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


__all__ = ["FlashVIDScorer", "flashvid_plan", "flashvid_batch", "flashvid_merge", "dyseg", "adts", "tstm_trees"]
