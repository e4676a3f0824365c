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
from typing import Optional

import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import layer_indices, register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers.attention import FastVScorer
from vtoken.scorers.base import Scorer, Selection, masked_scores
from vtoken.signals import SegmentSignals


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries, ties towards the lower index."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


def static_windows(static: torch.Tensor, max_window: int = 1024) -> tuple:
    """HoliTom's temporal segmentation from ``static`` (T-1, N) bool (``sim[f, p] > tau``):
    (list of (start, end) frame windows, tokens saved)."""
    T = static.shape[0] + 1
    saved = [[0] * T for _ in range(T)]  # saved[s][e] = static(s, e) * (e - s)
    for s in range(T - 1):
        run = torch.ones(static.shape[1], dtype=torch.bool)
        for e in range(s + 1, T):
            run &= static[e - 1]
            saved[s][e] = int(run.sum()) * (e - s)
    dp, prev = [0] * T, [0] * T
    for i in range(T):
        best, start = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + saved[j + 1][i]
            if value > best:
                best, start = value, j + 1
        dp[i], prev[i] = best, start
    windows, i = [], T - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], dp[-1]


def dpc_knn(x: torch.Tensor, centres: int, k: int) -> tuple:
    """DPC-kNN on x (M, D): (sorted centre indices (c,), nearest-centre index into them (M,))."""
    M, D = x.shape
    if centres <= 0 or M == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(M, dtype=torch.long)
    xd = x.double()
    dist = torch.cdist(xd, xd, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(D)
    near = torch.sort(dist, dim=-1).values[:, : min(k, M)]
    density = torch.exp(-(near ** 2).mean(-1))
    denser = density[None, :] > density[:, None]  # [i, j]: j denser than i
    delta = torch.where(denser, dist, dist.max().expand_as(dist)).min(-1).values
    idx = torch.sort(_top(delta * density, centres)).values
    return idx, dist[:, idx].argmin(dim=-1)


def holitom_merge(x: torch.Tensor, retain: float, tau: float = 0.8, K: int = 7, D: float = 0.0,
                  max_window: int = 1024, salience: Optional[torch.Tensor] = None) -> tuple:
    """HoliTom's pre-LLM rule on one video x (T, N, Dm) at retain ratio ``retain``.

    Returns (keep (T, N) bool, target (T, N) long: for each merged token the flat index of the
    kept token it merges into, -1 elsewhere, salience (T, N) float64). ``salience`` (T, N)
    defaults to each token's dot product with its frame's mean feature.
    """
    T, N, _ = x.shape
    xd = x.double()
    if salience is None:
        salience = (xd * xd.mean(1, keepdim=True)).sum(-1)
    keep = torch.zeros(T, N, dtype=torch.bool)
    target = torch.full((T, N), -1, dtype=torch.long)
    z = torch.nn.functional.normalize(xd, dim=-1)
    static_pairs = (z[:-1] * z[1:]).sum(-1) > tau  # (T-1, N)
    windows, saved = static_windows(static_pairs, max_window)
    total = T * N
    r = min(retain / ((total - saved) / total), 1)
    for start, end in windows:
        if start == end:
            still = torch.zeros(N, dtype=torch.bool)
        else:
            still = static_pairs[start:end].all(dim=0)
        dyn, st = torch.nonzero(~still).flatten(), torch.nonzero(still).flatten()
        # dynamic tokens of each frame: dominant by salience, contextual by DPC-kNN of the rest
        share = math.ceil(dyn.numel() * r)
        dominant = round(share * (1 - D))
        contextual = share - dominant
        for f in range(start, end + 1):
            top = dyn[_top(salience[f, dyn], dominant)]
            keep[f, top] = True
            if contextual > 0:
                rest = dyn[~keep[f, dyn]]
                cent, assign = dpc_knn(xd[f, rest], contextual, min(K, contextual))
                keep[f, rest[cent]] = True
                members = ~keep[f, rest]
                target[f, rest[members]] = f * N + rest[cent][assign[members]]
        # static tokens: frame-averaged, clustered, each cluster merged into its centre (first frame)
        clusters = round(st.numel() * r)
        if clusters > 0:
            feat = xd[start:end + 1, st].mean(0)
            cent, assign = dpc_knn(feat, clusters, min(K, clusters))
            keep[start, st[cent]] = True
            into = start * N + st[cent][assign]  # (n_static,)
            for f in range(start, end + 1):
                target[f, st] = into
            target[start, st[cent]] = -1
    return keep, target, salience


def _frames(sig: SegmentSignals, s: int, n: int) -> int:
    grid = sig.grid[s] if sig.grid is not None else None
    if grid is None or n != int(sig.original[s]) or grid[0] * grid[1] * grid[2] != n:
        return 1
    return int(grid[0])


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
        def rule(x: torch.Tensor, budget: int) -> tuple:
            return holitom_merge(x, budget / (x.shape[0] * x.shape[1]), self.tau, self.K, self.D, self.max_window)

        return select_videos(sig, rule, "holitom merges video tokens; pruning an image is not supported (HoliTom's "
                                        "released code leaves images whole)")


def select_videos(sig: SegmentSignals, rule, refusal: str) -> Selection:
    """Run a video rule on every video of ``sig`` and keep exactly each segment's budget.

    ``rule(x (T, N, D), budget) -> (chosen (T, N) bool, target (T, N) long flat index or -1,
    salience (T, N))`` sees one whole video: a segment with its (t, h, w) grid, or the
    consecutive temporal-group segments of one video (Qwen3-VL, one frame each; ``budget`` their
    total), after which each group keeps its own budget and merges stay inside a group. An image
    segment whose budget prunes it raises :class:`PruningConfigError` (``refusal`` + a hint).
    Returns the Selection (``merge_into`` set)."""
    out = (torch.zeros(sig.mask.shape, dtype=torch.bool), torch.full(sig.mask.shape, -1, dtype=torch.long),
           torch.zeros(sig.mask.shape, dtype=torch.float32))
    for members in _video_groups(sig):
        frames = []  # per segment: (segment, its slots in original order, budget)
        for s in members:
            slots = torch.nonzero(sig.mask[s].cpu()).flatten()
            b = min(int(sig.budget[s]), slots.numel())
            if sig.kind is not None and sig.kind[s] != "video" and b < slots.numel():
                raise PruningConfigError(
                    f"{refusal}: use an image method (e.g. visionzip, divprune) for prompts with images, or keep=1.0")
            index = sig.index[s, slots.to(sig.index.device)].cpu()
            frames.append((s, slots[torch.argsort(index)], b))  # candidates in original (frame-major) order
        if len(members) == 1:
            s, slot_of, b = frames[0]
            n = slot_of.numel()
            if n == 0:
                continue
            T = _frames(sig, s, n)
            x = sig.hidden[s, slot_of.to(sig.hidden.device)].reshape(T, n // T, -1).cpu()
            chosen, target, salience = rule(x, b)
            _finish(out, s, slot_of, b, chosen.flatten(), target.flatten(), salience.flatten())
            continue
        # one video over several segments (Qwen3-VL's temporal groups): the rule on the whole video,
        # each group keeps its own budget, merges stay inside a group
        x = torch.stack([sig.hidden[s, slot_of.to(sig.hidden.device)].cpu() for s, slot_of, _ in frames])
        N = x.shape[1]
        chosen, target, salience = rule(x, sum(b for _, _, b in frames))
        for f, (s, slot_of, b) in enumerate(frames):
            own = (target[f] >= f * N) & (target[f] < (f + 1) * N)
            _finish(out, s, slot_of, b, chosen[f], torch.where(own, target[f] - f * N, -1), salience[f])
    keep, merge_into, scores = out
    dev = sig.mask.device
    return Selection(keep=keep.to(dev), scores=masked_scores(scores.to(dev), sig.mask),
                     merge_into=merge_into.to(dev))


def _video_groups(sig: SegmentSignals) -> list:
    """Lists of segments to run together: the consecutive temporal-group segments of one video
    (``sig.video``), each unpruned with the same one-frame grid; every other segment alone."""
    groups, prev = [], None
    for s in range(sig.num_segments):
        v = sig.video[s] if sig.video is not None else None
        grid = sig.grid[s] if sig.grid is not None else None
        n = int(sig.mask[s].sum())
        ok = v is not None and grid is not None and grid[0] == 1 and grid[1] * grid[2] == n == int(sig.original[s])
        key = (int(sig.sample[s]), v, tuple(grid)) if ok else None
        if key is not None and key == prev:
            groups[-1].append(s)
        else:
            groups.append([s])
        prev = key
    return groups


def _finish(out, s: int, slot_of: torch.Tensor, b: int, chosen, target, salience) -> None:
    """Write one segment's selection into ``out`` (keep, merge_into, scores): the rule's tokens
    (``chosen`` (n,) bool) first, then the rest, by salience within each (ties to the lower
    index); the top ``b`` kept; ``target`` (n,) (index into the segment, -1: none) kept where it
    points at a kept token."""
    keep, merge_into, scores = out
    n = slot_of.numel()
    order = torch.sort(salience, descending=True, stable=True).indices
    order = order[torch.sort((~chosen[order]).long(), stable=True).indices]
    final = torch.zeros(n, dtype=torch.bool)
    final[order[:b]] = True
    valid = (target >= 0) & ~final
    valid[valid.clone()] = final[target[valid]]
    keep[s, slot_of[final]] = True
    merge_into[s, slot_of[valid]] = slot_of[target[valid]]
    scores[s, slot_of[order]] = torch.arange(n, 0, -1, dtype=torch.float32)


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


__all__ = ["HoliTomScorer", "holitom_plan", "holitom_merge", "static_windows", "dpc_knn", "select_videos"]
