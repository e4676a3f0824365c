"""PruneSID: semantic groups from a PCA of the visual features, near-duplicates removed inside each
group by NMS ranked by vision-encoder [CLS] attention, the budget shared among the groups, before
the LLM; followed by its method preset (the plan builder registered with
:func:`vtoken.methods.register_method`).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar

import torch

from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.base import Scorer, Selection, masked_scores
from vtoken.signals import SegmentSignals


def _components(x: torch.Tensor, groups: torch.Tensor, width: int) -> torch.Tensor:
    """Group of each token: the principal component (of the first ``groups[b]``) on which it
    loads most in absolute value. x (B, c, D), groups (B,) long, width = max(groups) (a host int)
    -> (B, c) long. PCA of sigmoid(x_b) taken as a (D, c) matrix (feature dimensions are the
    observations, tokens the variables), each token's column centred; exact batched SVD in
    float64 (``torch.linalg.svd``); the absolute loading makes the sign of each singular vector
    irrelevant; ties go to the lower component; at most the numerical rank of the centred matrix
    components (sv > sv_max * max(D, c) * eps, at least one)."""
    a = torch.sigmoid(x.double()).transpose(1, 2)  # (B, D, c)
    a = a - a.mean(dim=1, keepdim=True)
    _, sv, vh = torch.linalg.svd(a, full_matrices=False)  # sv (B, k), vh (B, k, c)
    # components past the numerical rank (at most D - 1 once centred) are arbitrary: dropped
    rank = (sv > sv[:, :1] * max(a.shape[1:]) * torch.finfo(sv.dtype).eps).sum(dim=1)
    used = torch.minimum(groups.to(rank.device), rank).clamp(min=1)  # (B,)
    load = vh[:, :width].abs()
    live = torch.arange(load.shape[1], device=load.device).view(1, -1, 1) < used.view(-1, 1, 1)
    return load.masked_fill(~live, -1.0).argmax(dim=1)  # first maximum: the lower component


def _suppression(sim: torch.Tensor, rank: torch.Tensor, group: torch.Tensor, alive: torch.Tensor,
                 threshold: torch.Tensor) -> torch.Tensor:
    """NMS edges: (B, c, c) float32, entry [b, i, j] = 1 where token i, if it survives, removes
    token j: i is a candidate, both are in the same group, i ranks above j and sim[b, i, j] exceeds
    the segment's threshold (the row of the kept token, as the released loop reads it)."""
    S = (sim > threshold.view(-1, 1, 1)) & (group.unsqueeze(2) == group.unsqueeze(1))
    S &= rank.unsqueeze(2) < rank.unsqueeze(1)
    S &= alive.unsqueeze(2)
    return S.float()


def _nms_step(alive: torch.Tensor, edges: torch.Tensor, survivor: torch.Tensor) -> torch.Tensor:
    """One Jacobi step of the NMS equations survivor_j = alive_j and no survivor i removes j:
    (B, c) bool -> (B, c) bool (one batched matmul; 0/1 counts are exact in float32 and TF32)."""
    removed = torch.bmm(survivor.float().unsqueeze(1), edges).squeeze(1) > 0
    return alive & ~removed


_NMS_STEPS = 8  # Jacobi steps before the convergence check (enough for the chains seen in practice)


def _nms(sim: torch.Tensor, rank: torch.Tensor, group: torch.Tensor, alive: torch.Tensor,
         threshold: torch.Tensor, rounds: int) -> tuple:
    """Per-group greedy NMS of all groups of all segments at once (the released loop: each group
    keeps its highest-ranked live token and removes the live tokens of that group more similar to
    it than the segment's ``threshold``, repeatedly). sim (B, c, c), rank / group (B, c) long,
    alive (B, c) bool (the candidates), threshold (B,), rounds = the largest group's size (a host
    int) -> (survivors (B, c) bool, "converged" (B,) bool on the device, the edges for
    :func:`_nms_finish`).

    The greedy result is the unique solution of survivor_j = alive_j and no survivor ranked above
    j in its group is more similar to j than the threshold (the edges form a DAG in rank order).
    Jacobi iteration from survivor = alive reaches it: after t steps every token whose longest
    chain of edges has fewer than t links is final, and a chain stays inside one group, so
    ``rounds`` steps always suffice. The first ``_NMS_STEPS`` steps run unconditionally; the
    caller reads the flag (one more step changes nothing) with its next host transfer and calls
    :func:`_nms_finish` only when it is False. No host sync here."""
    edges = _suppression(sim, rank, group, alive, threshold)
    survivor = alive
    for _ in range(min(_NMS_STEPS, rounds)):
        survivor = _nms_step(alive, edges, survivor)
    if rounds <= _NMS_STEPS:
        return survivor, torch.ones(alive.shape[0], dtype=torch.bool, device=alive.device), edges
    return survivor, (_nms_step(alive, edges, survivor) == survivor).all(dim=1), edges


def _nms_finish(alive: torch.Tensor, edges: torch.Tensor, survivor: torch.Tensor, rounds: int) -> torch.Tensor:
    """The remaining Jacobi steps, up to ``rounds`` in all (see :func:`_nms`)."""
    for _ in range(rounds - _NMS_STEPS):
        survivor = _nms_step(alive, edges, survivor)
    return survivor


def _allocate(size: list, nms: list, T: int, cap: int) -> list:
    """Tokens per group (Python ints), as the released code shares the budget ``T``: floor
    min(1, size); cap min(cap * ceil(T / 64), size, survivors), raised by one (up to the size)
    for every group while the caps sum below T; T - 1 - floors tokens shared in proportion to the
    survivors by rounded cumulative shares (exact, round half to even), capped; the shortfall
    filled group by group in decreasing survivor count (ties: the lower group). Sum: T - 1."""
    G = len(size)
    lower = [min(1, s) for s in size]
    upper = [min(cap * math.ceil(T / 64), s, k) for s, k in zip(size, nms)]
    while sum(upper) < T:
        upper = [min(u + 1, s) for u, s in zip(upper, size)]
    other = max(T - sum(lower) - 1, 0)
    total, run, cum = sum(nms), 0, []
    for k in nms:  # round(other * cumulative share), exactly (half to even)
        run += k
        cum.append(round(Fraction(other * run, total)) if total else 0)
    alloc = [min(cum[g] - (cum[g - 1] if g else 0) + lower[g], upper[g]) for g in range(G)]
    target = other + sum(lower)
    for g in sorted(range(G), key=lambda g: -nms[g]):
        missing = target - sum(alloc)
        if missing <= 0:
            break
        alloc[g] += min(upper[g] - alloc[g], missing)
    return alloc


def prunesid_batch(x: torch.Tensor, attn: torch.Tensor, budgets, tokens_per_component: int = 4,
                   nms_scale: float = 32.0, cap: int = 5) -> torch.Tensor:
    """PruneSID on B segments of the same size c. x (B, c, D) features, attn (B, c) [CLS]
    attention, budgets B ints -> (B, c) bool with exactly min(T_b, c) True per row. See
    :class:`PruneSIDScorer` for the rule. Two host syncs for the whole batch (group sizes; survivor
    counts with the NMS's convergence flag), a third only when a suppression chain outlasts the
    unconditional NMS steps; none per NMS round."""
    B, c, D = x.shape
    dev = x.device
    T = [max(0, min(int(t), c)) for t in budgets]
    keep = torch.zeros((B, c), dtype=torch.bool, device=dev)
    if B == 0 or c == 0:
        return keep
    ng = [min(max(1, int(t / tokens_per_component)), min(D, c)) for t in T]
    G = max(ng)
    group = _components(x, torch.tensor(ng, device=dev), G)  # (B, c)
    a = attn.double()
    order = torch.sort(a, dim=1, descending=True, stable=True).indices  # ties: the earlier token
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(c, device=dev).expand(B, c))
    z = F.unit_rows(x.double())
    sim = z @ z.transpose(1, 2)  # (B, c, c)
    iu = torch.triu_indices(c, c, offset=1, device=dev)
    mean = sim[:, iu[0], iu[1]].mean(dim=1) if c > 1 else torch.zeros(B, dtype=sim.dtype, device=dev)
    threshold = torch.tensor(T, dtype=sim.dtype, device=dev) / nms_scale * mean
    ones = torch.ones((B, c), dtype=torch.long, device=dev)
    counts = torch.zeros((B, G), dtype=torch.long, device=dev).scatter_add_(1, group, ones)
    size = counts.tolist()  # host sync 1
    rounds = max(max(row) for row in size)
    alive = a > 0
    survivor, converged, edges = _nms(sim, rank, group, alive, threshold, rounds)
    nms_t = torch.zeros((B, G + 1), dtype=torch.long, device=dev)
    nms_t[:, :G].scatter_add_(1, group, survivor.long())
    nms_t[:, G] = converged.long()
    nms = nms_t.tolist()  # sync 2: survivors per group, and whether the NMS had converged
    if not all(row[G] for row in nms):  # a chain longer than _NMS_STEPS: finish (one more sync)
        survivor = _nms_finish(alive, edges, survivor, rounds)
        nms = torch.zeros((B, G), dtype=torch.long, device=dev).scatter_add_(1, group, survivor.long()).tolist()
    alloc = torch.tensor([_allocate(size[b][: ng[b]], nms[b][: ng[b]], T[b], cap) + [0] * (G - ng[b])
                          for b in range(B)], dtype=torch.long, device=dev)
    # inside a group: survivors in NMS order (= decreasing attention), then the others by attention
    priority = torch.where(survivor, rank, rank + c)
    by = torch.sort(group * (2 * c) + priority, dim=1, stable=True).indices  # (B, c) grouped, in priority
    start = counts.cumsum(dim=1) - counts  # (B, G) first sorted position of each group
    g_by = group.gather(1, by)
    pos = torch.arange(c, device=dev).expand(B, c) - start.gather(1, g_by)
    keep.scatter_(1, by, pos < alloc.gather(1, g_by))
    # vtoken keeps exactly T: fill (the released [CLS] slot) with the most attended unkept
    # tokens, or trim the least attended kept ones
    Tt = torch.tensor(T, dtype=torch.long, device=dev)
    k = keep.sum(dim=1)
    in_order = keep.gather(1, order)  # (B, c) kept flags in decreasing attention
    fill = ~in_order & ((~in_order).long().cumsum(dim=1) <= (Tt - k).clamp(min=0).unsqueeze(1))
    from_end = in_order.long().flip(1).cumsum(dim=1).flip(1)  # kept tokens at or after each position
    trim = in_order & (from_end <= (k - Tt).clamp(min=0).unsqueeze(1))
    in_order = (in_order | fill) & ~trim
    keep = torch.zeros_like(keep).scatter_(1, order, in_order)
    keep |= (Tt == c).unsqueeze(1)
    keep &= (Tt > 0).unsqueeze(1)
    return keep


def prunesid_segment(x: torch.Tensor, attn: torch.Tensor, T: int, tokens_per_component: int = 4,
                     nms_scale: float = 32.0, cap: int = 5) -> torch.Tensor:
    """PruneSID on one segment. x (c, D) features, attn (c,) [CLS] attention, T the budget ->
    (c,) bool with exactly min(T, c) True (:func:`prunesid_batch` with B = 1)."""
    return prunesid_batch(x.unsqueeze(0), attn.unsqueeze(0), [T], tokens_per_component, nms_scale, cap)[0]


#: float64 working memory of one batched PruneSID call (segments beyond it go to further calls)
_CHUNK_BYTES = 1 << 30


@register_scorer
class PruneSIDScorer(Scorer):
    """PruneSID (Fang, Lyu et al., "Prune Redundancy, Preserve Essence: Vision Token Compression
    in VLMs via Synergistic Importance-Diversity", ICLR 2026, arXiv:2603.09480). Released code
    read: github.com/ZhengyaoFang/PruneSID at commit 390d7606
    (``prunesid/prunesid_llava/clip_encoder.py``: ``CLIPVisionTower_PruneSID.forward``).

    The released rule, before the LLM, with T = the budget (``need_token_num``), per segment of
    c visual tokens with features x (c, D) and [CLS] attention a (c,):

    1. Principal Semantic Component Analysis: PCA of sigmoid(x) as a (D, c) matrix (tokens are
       the variables) with G = int(T / 4) components (``tokens_per_component``); each token joins
       the component with its largest absolute loading.
    2. Intra-group NMS: in each group, tokens in decreasing attention; a kept token removes the
       group's remaining tokens whose cosine similarity (on x) to it exceeds
       (T / 32) * mean pairwise cosine similarity of all c tokens (``nms_scale`` = 32); tokens
       with zero attention never survive.
    3. Budget: floor min(1, group size); cap min(5 * ceil(T / 64), size, survivors) (``cap`` =
       5), all caps raised by one while they sum below T; T - 1 - floors shared in proportion to
       the survivor counts (rounded cumulative shares), capped, the shortfall filled in
       decreasing survivor count. Each group keeps its survivors in NMS order, then (when its
       share exceeds them) its other tokens by attention.

    Deviations:

    - Features. The released code reads the CLIP penultimate-layer output (before the projector)
      for both the PCA and the similarities; vtoken uses the projected embeddings entering the
      LLM (``hidden`` at layer 0), as VisPruner here does: there is no pre-projector feature
      signal. The attention is the same layer's [CLS] attention (``vision_attn``), heads averaged
      where the released code sums them (same order, same NMS).
    - [CLS]. The released tower returns [CLS] plus T - 1 patch tokens; [CLS] is not an LLM token
      in vtoken (LLaVA drops it), which keeps exactly T visual tokens per segment: the slot left
      (and any other difference from T) is filled with the most attended unkept tokens, or
      trimmed from the least attended kept ones.
    - PCA. The released ``torch.pca_lowrank`` is randomised; vtoken takes the exact SVD (float64,
      so results do not depend on the device's dtype); the absolute loadings make the singular
      vectors' signs irrelevant. G is at least 1 (int(T / 4) = 0 for T < 4) and at most the
      numerical rank of the centred (D, c) matrix (at most D - 1): components past it are
      arbitrary (zero singular value) in any solver.
    - Rounding. The shares are rounded exactly (rational arithmetic, half to even); the released
      float32 cumulative sum (accumulated differently on CPU and CUDA) can land a share one token
      off where it is a near-tie.
    - Ties. The released sorts are unstable; vtoken ranks equal attention by the earlier token,
      ties among groups by the lower group, loadings by the lower component.
    - Groups. A group whose share exceeds its members with nonzero attention takes its own
      zero-attention members (the released indexing could reach other groups' tokens there).
    - Dynamic ratio. The paper's information-aware per-image ratio is not applied: vtoken's
      budget is the one given per segment. LLaVA-NeXT crops are not pruned separately (the
      adapter has no [CLS] attention there: ``apply_pruning`` refuses).
    - Where it runs. It needs [CLS] attention (``needs_cls_attention``): LLaVA with a CLIP tower.
      Other adapters (Qwen-VL's mean attention received is no [CLS]) get a
      :class:`~vtoken.errors.PruningConfigError` from ``apply_pruning``.

    Cost: a float64 SVD of a (D, c) matrix and a (c, c) similarity per segment, batched over the
    segments of equal size (:func:`prunesid_batch`, in chunks of about 1 GiB of float64 work);
    the NMS runs as Jacobi steps on the suppression graph (one batched matmul each; 8 steps, then
    up to the largest group's size if a chain is longer), without a host sync per step: two host
    syncs per batched call (group sizes, survivor counts) for the integer budget sharing, three
    when the NMS needs more than 8 steps. The SVD bounds the cost: one batched call, but on CUDA
    PyTorch runs cuSOLVER's batched Jacobi SVD only for matrices of 32 or less a side, so a
    (4096, 576) segment gets its own ``gesvdj`` call (and a convergence-flag copy to the host). On
    an H100 at LLaVA-1.5-7B shapes the scorer adds about 41 ms a segment over the oracle's TTFT
    (batch 1 / 8 / 32, session 13; not profiled there); the SVD is 80-98 % of its CPU time. The exact alternatives (Gram matrix
    + ``eigh``, QR first) loop per matrix too, and resolve singular values only down to about 1e-8
    of the largest, against the rank rule's ``max(D, c) * eps``; the batched ones (``gesvda``,
    randomised or subspace iteration for the first components) are approximate.

    Signals: ``vision_attn`` (S, n), ``hidden`` (S, n, D) -> Selection. Scores (heatmaps): the
    attention. Diagnostics: ``erank`` of the kept tokens.
    """

    name = "prunesid"
    needs = frozenset({"vision_attn", "hidden"})
    pre_llm_only = True
    needs_cls_attention = True
    text_guided: ClassVar[bool] = False

    def __init__(self, tokens_per_component: int = 4, nms_scale: float = 32.0, cap: int = 5):
        if int(tokens_per_component) < 1:
            raise ValueError(f"tokens_per_component must be >= 1; got {tokens_per_component!r}")
        if not nms_scale > 0:
            raise ValueError(f"nms_scale must be > 0; got {nms_scale!r}")
        if int(cap) < 1:
            raise ValueError(f"cap must be >= 1; got {cap!r}")
        self.tokens_per_component = int(tokens_per_component)
        self.nms_scale = float(nms_scale)
        self.cap = int(cap)

    def select(self, sig: SegmentSignals) -> Selection:
        keep = torch.zeros_like(sig.mask)
        budgets = sig.budget.tolist()
        counts = sig.mask.sum(dim=1)
        # real slots of every segment first, in slot order (padding may sit anywhere)
        slots = torch.sort((~sig.mask).to(torch.uint8), dim=1, stable=True).indices
        by_count = {}
        for s, c in enumerate(counts.tolist()):
            if c:
                by_count.setdefault(c, []).append(s)
        D = sig.hidden.shape[-1]
        # one batched call per segment size, in chunks of about _CHUNK_BYTES of float64 work
        # (the (D, c) matrix of the SVD and the (c, c) similarities of each segment)
        chunks = []
        for c, segs in by_count.items():
            per = max(1, _CHUNK_BYTES // (8 * c * (D + c)))
            chunks += [(c, segs[i:i + per]) for i in range(0, len(segs), per)]
        for c, segs in chunks:
            rows = torch.tensor(segs, device=sig.mask.device)
            idx = slots[rows, :c]  # (B, c)
            x = sig.hidden[rows].gather(1, idx.unsqueeze(-1).expand(-1, -1, sig.hidden.shape[-1]))
            a = sig.vision_attn[rows].gather(1, idx).nan_to_num(0.0)
            kept = prunesid_batch(x, a, [budgets[s] for s in segs], self.tokens_per_component, self.nms_scale,
                                  self.cap)
            keep[rows.unsqueeze(1), idx] = kept
        sig.diagnostics["erank"] = F.deferred_erank(sig.hidden, keep)
        return Selection(keep=keep, scores=masked_scores(sig.vision_attn, sig.mask))


@register_method(name="prunesid", family="diversity",
                 paper="Fang, Lyu et al., ICLR 2026 (arXiv:2603.09480)",
                 stages="layer 0 (before the LLM)", needs_attention=False, text_guided=False,
                 options=("tokens_per_component", "nms_scale", "cap", "mode"),
                 released_code="ZhengyaoFang/PruneSID@390d760")
def prunesid_plan(keep, tokens_per_component: int = 4, nms_scale: float = 32.0, cap: int = 5,
                  mode: str = "select"):
    """PruneSID preset: one stage before the LLM (see :class:`PruneSIDScorer`)."""
    scorer = PruneSIDScorer(tokens_per_component=tokens_per_component, nms_scale=nms_scale, cap=cap)
    return [Stage(layer=0, scorer=scorer, keep=validate_budget(keep), mode=mode)]


__all__ = ["PruneSIDScorer", "prunesid_batch", "prunesid_segment", "prunesid_plan"]
