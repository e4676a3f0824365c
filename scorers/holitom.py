"""HoliTom's holistic token merging for video: global redundancy-aware temporal segmentation,
then spatio-temporal merging before the LLM, and (optionally) similarity merging inside it;
followed by its method preset (the plan builder registered with
:func:`vtoken.methods.register_method`).

Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models"
(arXiv:2505.21334). Released code read: github.com/cokeshao/HoliTom at commit
b1d1412d62944dc908a4afa155ce245042eca0e2 (the newest commit touching ``holitom/``):
``holitom/llava_arch.py`` (``select_static_windows``, ``get_static_dynamic_features``,
``merge_tokens_by_attention_density``, ``merge_tokens_by_density``, ``cluster_dpc_knn``,
``merge_tokens_by_clustering``) and ``holitom/modeling_qwen2.py`` (the in-LLM merge), with the
defaults of the code and of ``scripts/eval_ov-7b_holitom.sh``: ``tau`` (``T``) = 0.8, ``K`` = 7,
``D`` = 0, ``MAX_WINDOW_SIZE`` = 1024, in-LLM merge at layer ``HOLITOM_k`` = 18 with
``HOLITOM_r`` = 0.5.

The released rule on one video x (T frames, N tokens a frame, D features: the pooled projected
features entering the LLM) with retain ratio r:

1. Temporal segmentation. ``sim[f, p]`` = cosine of token p in frames f and f + 1. A window
   [s, e] of frames saves ``static(s, e) * (e - s)`` tokens, static(s, e) being the tokens
   whose every ``sim[s..e-1, p] > tau``. A dynamic programme over the frames picks the
   windows (of at most ``max_window`` frames) that save the most: ``dp[i]`` starts from
   ``dp[i-1]`` (frame i alone) and takes a window [j+1, i] of 2, 3, ... frames only when it
   saves strictly more (so ties keep the shorter window); windows are read back from the end.
2. The retain ratio is raised to ``r' = min(r / ((TN - saved) / TN), 1)``.
3. Per window of W frames: its static tokens (``sim > tau`` all through the window) are
   averaged over the W frames, then clustered by DPC-kNN (``round(n_static * r')`` centres,
   ``min(K, centres)`` nearest neighbours for the density, each other token to its nearest
   centre) and each cluster merged into one token; the dynamic tokens of every frame keep
   their top ``round(ceil(n_dyn * r') * (1 - D))`` by attention ("dominant"), and with D > 0
   the rest of the frame's ``ceil(n_dyn * r')`` are DPC-kNN centres of the other dynamic
   tokens, merged likewise ("contextual"); the other dynamic tokens are dropped.
4. Inside the LLM (``HOLITOM_k`` / ``HOLITOM_r`` set, as in every released script): at layer k
   the visual tokens are ranked by the last token's attention in layer k-1 (heads averaged);
   the top ``round(n * (1 - r_llm))`` are kept and every other token is merged into the kept
   token of most similar hidden state (cosine).

In vtoken: stage 1 (layer 0, :class:`HoliTomScorer`, ``mode="merge"``) keeps a static cluster
as its centre token in the window's first frame -- every static token of the cluster, in every
frame of the window, merges into it (``Selection.merge_into``), so the merged token is the mean
of the cluster's frame-averaged features -- and the dominant / contextual tokens where they are;
stage 2 (layer k = ``layers[0]``, :class:`~vtoken.scorers.attention.FastVScorer`, ``mode="merge"``:
the runtime merges every dropped token into its most similar kept one) keeps
``round(keep * (1 - r_llm))`` (option ``r``); ``layers=()`` leaves it out (the released
"HoliTom (w/o M)"). Its layer k reads layer k-1's attention, as the released code does.

Budget: vtoken's budget b of a T x N video sets ``r = b / (T N)``; the tokens the rule above
keeps rank first, the rest after them, each by salience (then position), and the top b are
kept, so the count is exactly b (the released count differs from ``r T N`` by the rounding of
each window's counts): where the rule keeps more, its least salient tokens are dropped; where
it keeps fewer, the most salient of the others are added. A dropped token whose merge target
is not kept is dropped unmerged.

Deviations from the released code:

* Attention: the released dominant tokens are the top of the vision encoder's mean attention
  received (last SigLIP layer, heads and queries averaged, 2 x 2 pooled); vtoken has no encoder
  attention for video, so salience is each token's dot product with its frame's mean feature
  (the mean-query form on the features entering the LLM, as vtoken's FastVID).
* Merge weights: vtoken's merge is an equal-weight mean, i.e. the released ``NO_BETA=1`` branch;
  without that variable the released clustering weighs the centre by ``BETA`` = 0.6 and the
  members' mean by 0.4. The in-LLM merge of the released code averages pairwise in sequence
  (``(h + x) / 2`` per merged token); vtoken takes the mean of the kept token and all its
  members.
* Order: kept tokens keep their original positions (M-RoPE / 1-D positions) and order; the
  released code re-packs the static tokens into the window's first frame and re-sorts them.
* DPC-kNN: no random noise on the densities (the released code adds ``1e-6 * rand``); equal
  densities are not "denser" than each other; top-k and nearest-centre ties break towards the
  lower index; distances in float64 (released float32).
* Cost: the whole batch in one call with two host syncs (the segments' counts; the static-run
  counts, for the dynamic programme and the integer counts), whatever the number of videos,
  frames or windows: the dominant tokens of every frame and the DPC-kNN of every window (and, with
  D > 0, of every frame) run as padded, masked batches (float64 distances (windows, N, N)).
* Video layouts: a video that is one segment with its (t, h, w) grid (Qwen2-VL, Qwen2.5-VL,
  LLaVA-OneVision) gets the whole rule. Qwen3-VL's prompt puts each temporal patch group in
  its own timestamped span, so vtoken's adapter makes each group a segment with its own budget
  (``sig.video`` says which segments are one video): the rule runs over the whole video
  (windows and clusters across the groups, ``r`` from the groups' total budget) and each group
  then keeps exactly its budget -- the rule's tokens of that group first, its others after
  them, by salience -- so a window's static clusters sit in its first group, while every group
  keeps as many tokens as the others; merges stay inside a group (a static token of a later
  group is dropped, not merged into the first group's centre). A video segment without a known
  grid, or already pruned, is one frame.
* Images: the released code leaves images whole (it only touches ``modalities == "video"``),
  which cannot meet a vtoken budget; an image segment whose budget prunes it raises
  :class:`~vtoken.errors.PruningConfigError` ("not supported": use a method for images, or
  ``keep=1.0``). Where the segment kind is unknown (hand-built signals) every segment is video.
"""

from __future__ import annotations

import math
import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import layer_indices, register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers.attention import FastVScorer
from vtoken.scorers.base import (Scorer, Selection, dpc_knn_batch, frame_means, full_grid, lex_rank, masked_scores,
                                 position_slots, segment_counts, to_slots)
from vtoken.signals import SegmentSignals


def _static_runs(static: torch.Tensor) -> torch.Tensor:
    """static (B, F, N) bool (``sim[f, p] > tau`` of frame pairs f, f + 1) -> run (B, F, F, N)
    bool: ``run[b, s, f, p]`` = token p static in every pair s..f (False for f < s)."""
    F = static.shape[1]
    ahead = torch.arange(F, device=static.device)
    ahead = ahead[None, :] >= ahead[:, None]  # [s, f]: f >= s
    vals = torch.where(ahead[None, :, :, None], static[:, None].to(torch.uint8), 1)
    return torch.cumprod(vals, dim=2).bool() & ahead[None, :, :, None]


def windows_from_counts(count: list, T: int, max_window: int = 1024) -> tuple:
    """HoliTom's dynamic programme on the host: ``count[s][e - 1]`` the tokens static in every
    frame pair s..e-1 (a window [s, e] saves ``count * (e - s)``) -> (list of (start, end) frame
    windows, tokens saved). Ties keep the shorter window; windows are read back from the end."""
    dp, prev = [0] * T, [0] * T
    for i in range(T):
        best, start = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + count[j + 1][i - 1] * (i - j - 1)
            if value > best:
                best, start = value, j + 1
        dp[i], prev[i] = best, start
    windows, i = [], T - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], dp[-1]


def static_windows(static: torch.Tensor, max_window: int = 1024) -> tuple:
    """HoliTom's temporal segmentation from ``static`` (T-1, N) bool (``sim[f, p] > tau``):
    (list of (start, end) frame windows, tokens saved)."""
    T = static.shape[0] + 1
    count = _static_runs(static[None])[0].sum(-1).tolist() if T > 1 else []
    return windows_from_counts(count, T, max_window)


def holitom_batch(x: torch.Tensor, real: torch.Tensor, shapes: list, retain: list, tau: float = 0.8, K: int = 7,
                  D: float = 0.0, max_window: int = 1024) -> tuple:
    """HoliTom's pre-LLM rule on B videos at once. x (B, M, Dm): each row's tokens frame-major,
    ``shapes[b] = (T, N)`` (``T * N`` real positions first, ``real`` (B, M) marks them),
    ``retain`` B ratios. Returns (keep (B, M) bool, target (B, M) long: for each merged token the
    position of the kept token it merges into, -1 elsewhere, salience (B, M) float64: each
    token's dot product with its frame's mean feature). One host sync (the static-run counts,
    for the dynamic programme and the integer counts); the dominant tokens of every frame and
    the DPC-kNN of every window (and frame, with D > 0) run as padded, masked batches."""
    B, M, Dm = x.shape
    dev = x.device
    keep = torch.zeros((B, M + 1), dtype=torch.bool, device=dev)
    target = torch.full((B, M + 1), -1, dtype=torch.long, device=dev)
    if B == 0 or M == 0:
        return keep[:, :M], target[:, :M], torch.zeros((B, M), dtype=torch.float64, device=dev)
    Tm, Nm = max(t for t, _ in shapes), max(max(n for _, n in shapes), 1)
    xd = x.double()
    per = torch.tensor([max(n, 1) for _, n in shapes], device=dev)
    frame, mean = frame_means(xd, real, per, Tm)
    salience = (xd * mean.gather(1, frame.unsqueeze(-1).expand(B, M, Dm))).sum(-1)
    # static pairs on a (B, Tm - 1, Nm) grid, their runs, and the counts the host needs
    T_ = torch.tensor([t for t, _ in shapes], device=dev)
    col = torch.arange(Nm, device=dev)
    in_grid = col < per[:, None]  # (B, Nm)
    if Tm > 1:
        z = torch.nn.functional.normalize(xd, dim=-1)
        q = torch.arange(M, device=dev).expand(B, M)
        nxt = (q + per[:, None]).clamp(max=M - 1)
        sim = (z * z.gather(1, nxt.unsqueeze(-1).expand(B, M, Dm))).sum(-1)
        static = real & (frame < (T_ - 1)[:, None]) & (sim > tau)
        g = (torch.arange(Tm - 1, device=dev)[None, :, None] * per[:, None, None] + col).clamp(max=M - 1)
        grid = static.gather(1, g.reshape(B, -1)).reshape(B, Tm - 1, Nm) & in_grid[:, None]
        run = _static_runs(grid)  # (B, Tm - 1, Tm - 1, Nm)
        counts = run.sum(-1).tolist()  # the host sync
    else:
        run, counts = None, [[] for _ in range(B)]
    # the host: windows and every integer count of the rule
    wins, frames_, clusters_ = [], [], []  # window rows; frame rows; static-clustering rows
    for b, (T, N) in enumerate(shapes):
        if T * N == 0:
            continue
        windows, saved = windows_from_counts(counts[b], T, max_window)
        r = min(retain[b] / ((T * N - saved) / (T * N)), 1)
        for start, end in windows:
            n_static = counts[b][start][end - 1] if end > start else 0
            share = math.ceil((N - n_static) * r)
            dominant = round(share * (1 - D))
            contextual = share - dominant
            clusters = round(n_static * r)
            w = len(wins)
            wins.append((b, start, end - 1, 1, N) if end > start else (b, 0, 0, 0, N))  # run[b, start, end - 1]
            if clusters > 0:
                clusters_.append((w, b, start, end, clusters, min(K, clusters), N))
            frames_ += [(w, b, f, N, dominant, contextual, min(K, max(contextual, 1)), start,
                         len(clusters_) - 1 if clusters > 0 else -1) for f in range(start, end + 1)]
    if not wins:
        return keep[:, :M], target[:, :M], salience
    wb, ws, we, wlong, wN = torch.tensor(wins, dtype=torch.long, device=dev).unbind(1)
    still = in_grid[wb] & (wlong[:, None] > 0)  # (W, Nm): static all through the window
    if run is not None:
        still &= run[wb, ws, we]
    # dynamic tokens of every frame: the dominant ones by salience, with D > 0 contextual centres
    fw, fb, ff, fN, dom, ctx, kctx, fstart, fc = torch.tensor(frames_, dtype=torch.long, device=dev).unbind(1)
    valid = col < fN[:, None]
    pos = torch.where(valid, ff[:, None] * fN[:, None] + col, M)
    dyn = valid & ~still[fw]
    sal = torch.where(dyn, salience[fb[:, None], pos.clamp(max=M - 1)], -math.inf)
    top = dyn & (lex_rank((sal, True)) < dom[:, None])
    chosen = top
    rows = fb[:, None].expand_as(pos)
    if any(r[5] > 0 for r in frames_):
        cent, near = dpc_knn_batch(xd[fb[:, None], pos.clamp(max=M - 1)], dyn & ~top, ctx, kctx, exact=True)
        chosen = chosen | cent
        members = dyn & ~top & ~cent & (ctx[:, None] > 0)
        target.index_put_((rows, torch.where(members, pos, M)), ff[:, None] * fN[:, None] + near)
    keep.index_put_((rows, torch.where(chosen, pos, M)), chosen)
    # static tokens of every window: frame-averaged, clustered, merged into the centres (first frame)
    if clusters_:
        cw, cb, cs, ce, cn, ck, cN = torch.tensor(clusters_, dtype=torch.long, device=dev).unbind(1)
        feat = torch.zeros((len(clusters_), Nm, Dm), dtype=torch.float64, device=dev)
        for L in sorted({e - s + 1 for _, _, s, e, *_ in clusters_}):  # windows of L frames together
            at = [i for i, c in enumerate(clusters_) if c[3] - c[2] + 1 == L]
            i = torch.tensor(at, device=dev)
            f = cs[i, None] + torch.arange(L, device=dev)  # (n, L)
            p = (f[..., None] * cN[i, None, None] + col).clamp(max=M - 1)  # (n, L, Nm)
            feat[i] = xd[cb[i, None, None], p].mean(1)
        cent, near = dpc_knn_batch(feat, still[cw], cn, ck, exact=True)
        first = torch.where(cent, cs[:, None] * cN[:, None] + col, M)
        keep.index_put_((cb[:, None].expand_as(first), first), cent)
        # every frame of the window: its static tokens merge into the cluster's centre
        has = fc >= 0
        c = fc.clamp(min=0)
        into = cs[c][:, None] * fN[:, None] + near[c]
        merged = has[:, None] & still[fw] & valid & ~((ff == fstart)[:, None] & cent[c])
        target.index_put_((rows, torch.where(merged, pos, M)), into)
    return keep[:, :M], target[:, :M], salience


def holitom_merge(x: torch.Tensor, retain: float, tau: float = 0.8, K: int = 7, D: float = 0.0,
                  max_window: int = 1024) -> tuple:
    """HoliTom's pre-LLM rule on one video x (T, N, Dm) at retain ratio ``retain``
    (:func:`holitom_batch` with B = 1): (keep (T, N) bool, target (T, N) long flat index or -1,
    salience (T, N) float64)."""
    T, N, Dm = x.shape
    real = torch.ones((1, T * N), dtype=torch.bool, device=x.device)
    keep, target, salience = holitom_batch(x.reshape(1, T * N, Dm), real, [(T, N)], [retain], tau, K, D, max_window)
    return keep.reshape(T, N), target.reshape(T, N), salience.reshape(T, N)


@register_scorer
class HoliTomScorer(Scorer):
    """HoliTom's pre-LLM stage (Shao et al., arXiv:2505.21334; released code
    cokeshao/HoliTom@b1d1412): temporal windows of frames chosen by a dynamic programme over
    token-wise static runs, static tokens of a window averaged over its frames and clustered
    (DPC-kNN) into merged tokens, and the most salient dynamic tokens of every frame kept. See
    the module docstring for the rule, the budget mapping and every deviation (salience from
    the hidden states; equal-weight merges; images refused).

    Signals: ``hidden`` (S, n, D), ``grid``, ``kind``, ``video`` -> Selection (exactly ``budget``
    tokens per segment; ``merge_into`` (S, n): run the stage with ``mode="merge"``).
    """

    name = "holitom"
    needs = frozenset({"hidden"})

    def __init__(self, tau: float = 0.8, K: int = 7, D: float = 0.0, max_window: int = 1024):
        if not 0.0 <= D <= 1.0:
            raise PruningConfigError(f"holitom D must lie in [0, 1]; got {D!r}")
        if int(K) < 1 or int(max_window) < 1:
            raise PruningConfigError(f"holitom K and max_window must be >= 1; got {K!r}, {max_window!r}")
        self.tau, self.K, self.D, self.max_window = float(tau), int(K), float(D), int(max_window)

    def select(self, sig: SegmentSignals) -> Selection:
        def rule(x: torch.Tensor, real: torch.Tensor, shapes: list, budgets: list) -> tuple:
            retain = [b / (T * N) for (T, N), b in zip(shapes, budgets)]
            return holitom_batch(x, real, shapes, retain, self.tau, self.K, self.D, self.max_window)

        return select_videos(sig, rule, "holitom merges video tokens; pruning an image is not supported (HoliTom's "
                                        "released code leaves images whole)")


def select_videos(sig: SegmentSignals, rule, refusal: str) -> Selection:
    """Run a video rule on every video of ``sig`` at once and keep exactly each segment's budget.

    ``rule(x (V, M, D), real (V, M), shapes, budgets) -> (chosen (V, M) bool, target (V, M) long:
    a position or -1, salience (V, M))`` sees whole videos, each row's tokens frame-major
    (``shapes[v] = (T, N)``, ``budgets[v]`` host ints): a segment with its (t, h, w) grid, or the
    consecutive temporal-group segments of one video (Qwen3-VL, one frame each; the budget their
    total), after which each group keeps its own budget and merges stay inside a group. An image
    segment whose budget prunes it raises :class:`PruningConfigError` (``refusal`` + a hint).
    Returns the Selection (``merge_into`` set). One host sync here (the segments' counts) besides
    the rule's own."""
    mask = sig.mask
    dev, (S, n) = mask.device, mask.shape
    counts, budgets, original, sample = segment_counts(sig, sig.sample)
    budgets = [min(b, c) for b, c in zip(budgets, counts)]
    for s in range(S):
        if sig.kind is not None and sig.kind[s] != "video" and budgets[s] < counts[s]:
            raise PruningConfigError(
                f"{refusal}: use an image method (e.g. visionzip, divprune) for prompts with images, or keep=1.0")
    slot, real = position_slots(sig, counts, [True] * S)  # candidates in original (frame-major) order
    # per video: (T, N, tokens a segment) and its segments; per segment: (segment, video, offset)
    rows, members, places = [], [], []
    for group in _video_groups(sig, counts, original, sample):
        if counts[group[0]] == 0:
            continue
        if len(group) == 1:
            s = group[0]
            grid = full_grid(sig, s, counts[s], original[s])
            T = grid[0] if grid else 1
            rows.append((T, counts[s] // T, counts[s]))
        else:
            rows.append((len(group), counts[group[0]], counts[group[0]]))
        places += [(s, len(rows) - 1, i * rows[-1][2]) for i, s in enumerate(group)]
        members.append(group)
    keep = torch.zeros((S, n), dtype=torch.bool, device=dev)
    merge_into = torch.full((S, n), -1, dtype=torch.long, device=dev)
    scores = torch.zeros((S, n), dtype=torch.float32, device=dev)
    if rows:
        # the videos' tokens, frame-major: position q of video v is token q % per of segment members[v][q // per]
        V, M = len(rows), max(T * N for T, N, _ in rows)
        G = max(len(g) for g in members)
        seg = torch.tensor([g + [g[-1]] * (G - len(g)) for g in members], dtype=torch.long, device=dev)
        per = torch.tensor([p for _, _, p in rows], dtype=torch.long, device=dev)[:, None]
        q = torch.arange(M, device=dev).expand(V, M)
        vreal = q < torch.tensor([T * N for T, N, _ in rows], device=dev)[:, None]
        sq = seg.gather(1, torch.where(vreal, q // per, 0))
        x = sig.hidden[sq, slot[sq, torch.where(vreal, q % per, 0)]]
        chosen, target, salience = rule(x, vreal, [(T, N) for T, N, _ in rows],
                                        [sum(budgets[s] for s in g) for g in members])
        # each segment: its part of its video, its own budget; merges stay inside the segment
        segs, video, off = (torch.tensor(c, dtype=torch.long, device=dev) for c in zip(*places))
        at = (off[:, None] + torch.arange(n, device=dev)).clamp(max=M - 1)
        mine = real[segs]
        ch = chosen[video[:, None], at] & mine
        tg = target[video[:, None], at] - off[:, None]
        tg = torch.where(mine & (tg >= 0) & (tg < per[video]), tg, -1)
        sal = salience[video[:, None], at]
        # the rule's tokens first, then the rest, then padding; by salience within each
        rank = lex_rank(((~ch).long() + 2 * (~mine).long(), False), (sal, True))
        count = torch.tensor([counts[s] for s, _, _ in places], device=dev)[:, None]
        final = mine & (rank < torch.tensor([budgets[s] for s, _, _ in places], device=dev)[:, None])
        into = (tg >= 0) & ~final & final.gather(1, tg.clamp(min=0))
        own = slot[segs]
        keep[segs] = to_slots(final, own, mine)
        merge_into[segs] = to_slots(torch.where(into, own.gather(1, tg.clamp(min=0)), -1) + 1, own, mine) - 1
        scores[segs] = to_slots((count - rank).float(), own, mine)
    return Selection(keep=keep, scores=masked_scores(scores, mask), merge_into=merge_into)


def _video_groups(sig: SegmentSignals, counts: list, original: list, sample: list) -> list:
    """Lists of segments to run together: the consecutive temporal-group segments of one video
    (``sig.video``), each unpruned with the same one-frame grid; every other segment alone."""
    groups, prev = [], None
    for s in range(sig.num_segments):
        v = sig.video[s] if sig.video is not None else None
        grid = sig.grid[s] if sig.grid is not None else None
        ok = v is not None and grid is not None and grid[0] == 1 and grid[1] * grid[2] == counts[s] == original[s]
        key = (sample[s], v, tuple(grid)) if ok else None
        if key is not None and key == prev:
            groups[-1].append(s)
        else:
            groups.append([s])
        prev = key
    return groups


@register_method(name="holitom", family="diversity", paper="Shao et al. 2025 (arXiv:2505.21334)",
                 stages="layer 0 (before the LLM, merge) and layer 18 (merge)", needs_attention=True,
                 text_guided=True, options=("layers", "r", "tau", "K", "D", "max_window"),
                 released_code="cokeshao/HoliTom@b1d1412")
def holitom_plan(keep, layers=(18,), r: float = 0.5, tau: float = 0.8, K: int = 7, D: float = 0.0,
                 max_window: int = 1024):
    """HoliTom preset: the pre-LLM stage (:class:`HoliTomScorer`, merge) keeping ``keep``, then the
    in-LLM merge at layer ``layers[0]`` (``HOLITOM_k``) keeping ``keep * (1 - r)`` (last-token
    attention; every dropped token merged into its most similar kept token). ``layers=()``: no
    in-LLM merge (the released "HoliTom (w/o M)")."""
    keep = validate_budget(keep)
    plan = [Stage(layer=0, scorer=HoliTomScorer(tau=tau, K=K, D=D, max_window=max_window), keep=keep, mode="merge")]
    layers = layer_indices(layers, "holitom layers") if layers else ()
    if len(layers) > 1 or (layers and layers[0] < 1):
        raise PruningConfigError(f"holitom layers names at most one LLM layer >= 1 (HOLITOM_k); got {layers!r}")
    if layers:
        if not 0.0 <= r < 1.0:
            raise PruningConfigError(f"holitom r (share merged inside the LLM) must lie in [0, 1); got {r!r}")
        second = max(1, int(round(keep * (1 - r)))) if isinstance(keep, int) else keep * (1 - r)
        plan.append(Stage(layer=layers[0], scorer=FastVScorer(), keep=second, mode="merge"))
    return plan


__all__ = ["HoliTomScorer", "holitom_plan", "holitom_batch", "holitom_merge", "static_windows", "windows_from_counts",
           "select_videos"]
