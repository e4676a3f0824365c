"""The scorer interface and the one selection rule most scorers share (top-k per segment).

A scorer turns a :class:`vtoken.signals.SegmentSignals` into a :class:`Selection`. Scorers are
pure: they read only their signals, never the model, and hold no state between calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from vtoken.signals import SegmentSignals


@dataclass
class Selection:
    """A stage's decision for S padded segments of n candidate slots.

    keep:       (S, n) bool, True = the candidate survives; never True on a padding slot;
                exactly ``budget[s]`` True per row unless the scorer is adaptive.
    scores:     (S, n) float or None, the ranking signal (higher = more important), for
                heatmaps and diagnostics; padding slots hold -inf.
    merge_into: (S, n) long or None; in merge mode, for each dropped slot the kept slot it is
                merged into (-1 where nothing is merged). None lets the runtime choose by
                cosine similarity of hidden states.
    """

    keep: torch.Tensor
    scores: Optional[torch.Tensor] = None
    merge_into: Optional[torch.Tensor] = None
    #: set by :func:`topk_selection` only: the (mask, budget) tensors ``keep`` was made from; keep
    #: holds exactly ``min(budget, real slots)`` per row and nothing outside the mask by
    #: construction, so when they are the stage's own ``sig.mask`` / ``sig.budget`` the runtime
    #: skips its budget check (a reduction and a device sync per stage)
    exact_for: Optional[tuple] = None


class Scorer:
    """Base class. Subclasses set ``name``, ``needs`` and implement :meth:`select`
    (or :meth:`score` for plain top-k selection)."""

    name: ClassVar[str] = "scorer"
    #: Signal names (see ``vtoken.signals.SIGNAL_NAMES``) this scorer reads.
    needs: ClassVar[frozenset] = frozenset()
    #: True when the scorer chooses its own per-segment count (e.g. ZipVL).
    adaptive: ClassVar[bool] = False
    #: True when the scorer can only run before the LLM (layer 0), e.g. on vision-encoder signals.
    pre_llm_only: ClassVar[bool] = False
    #: True when ``vision_attn`` must be the encoder's [CLS] attention (not the mean attention a
    #: token receives, the stand-in on towers without [CLS]); ``apply_pruning`` refuses the plan
    #: on adapters whose ``vision_attn_from_cls`` is False (e.g. PruneSID on Qwen-VL).
    needs_cls_attention: ClassVar[bool] = False

    def score(self, sig: SegmentSignals) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def select(self, sig: SegmentSignals) -> Selection:
        return topk_selection(self.score(sig), sig.mask, sig.budget)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def masked_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores as float32 with -inf on padding slots and finite values on real ones (NaN and -inf
    become the lowest finite float32, +inf the highest), so every real slot ranks above every
    padding slot (:func:`topk_mask` keeps exactly ``min(budget, real slots)``)."""
    f = torch.finfo(torch.float32)
    return scores.float().nan_to_num(nan=f.min, posinf=f.max, neginf=f.min).masked_fill(~mask, float("-inf"))


def topk_selection(scores: torch.Tensor, mask: torch.Tensor, budget: torch.Tensor) -> Selection:
    """The plain top-k :class:`Selection`: keep = :func:`topk_mask`, scores masked with -inf on
    padding (computed once for both); ``exact_for`` records the mask and budget it obeys."""
    s = masked_scores(scores, mask)
    return Selection(keep=_topk_of_masked(s, mask, budget), scores=s, exact_for=(mask, budget))


def topk_mask(scores: torch.Tensor, mask: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Keep the ``budget[s]`` highest-scoring real slots of each row, vectorised over rows.

    scores (S, n) float, mask (S, n) bool, budget (S,) long -> (S, n) bool.
    Ties break towards the lower slot index (stable sort), so results are deterministic.
    """
    return _topk_of_masked(masked_scores(scores, mask), mask, budget)


def _topk_of_masked(s: torch.Tensor, mask: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # (S, n)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return (rank < budget.to(s.device).unsqueeze(1)) & mask


def demote(scores: torch.Tensor, flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Move the flagged real slots below every unflagged real slot, keeping their order.

    scores (S, n), flags (S, n) bool, mask (S, n) -> (S, n) float32 (finite on real slots, so
    flagged tokens are still chosen, last, when a budget exceeds the unflagged count).
    """
    s = scores.float()
    real = mask & torch.isfinite(s)
    lo = torch.where(real, s, torch.full_like(s, float("inf"))).min(dim=1, keepdim=True).values
    hi = torch.where(real, s, torch.full_like(s, float("-inf"))).max(dim=1, keepdim=True).values
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    span = (hi - lo).clamp(min=1e-12)
    low = lo - 2.0 + (s.clamp(min=-1e30, max=1e30) - lo) / span  # in [lo - 2, lo - 1]
    return torch.where(flags & mask, low, s)


def promote(scores: torch.Tensor, flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Move the flagged real slots above every unflagged real slot, keeping their order."""
    return -demote(-scores.float(), flags, mask)


# -- whole-batch helpers for the per-segment rules (a fixed number of host syncs per call) ----


def segment_counts(sig: SegmentSignals, *extra: torch.Tensor) -> tuple:
    """(counts, budgets, original, *extra): host lists of each segment's real slots, budget,
    original token count and of any other (S,) integer tensors. One host sync."""
    dev = sig.mask.device
    rows = [sig.mask.sum(1), sig.budget.to(dev), sig.original.to(dev)] + [e.to(dev).long() for e in extra]
    return tuple(torch.stack(rows).tolist())


def full_grid(sig: SegmentSignals, s: int, count: int, original: int) -> Optional[tuple]:
    """Segment s's (t, h, w) where it is known and complete (no token pruned yet), else None."""
    grid = sig.grid[s] if sig.grid is not None else None
    if grid is None or count != original or grid[0] * grid[1] * grid[2] != count:
        return None
    return tuple(int(g) for g in grid)


def position_slots(sig: SegmentSignals, counts: list, by_index: list) -> tuple:
    """Each segment's real tokens in position order, for rules that work on positions (frame-major
    grids): position p of segment s is its real token of the p-th smallest original index where
    ``by_index[s]`` (index p on a complete grid), else its p-th real slot. -> (slot (S, n) long:
    the slot at each position, real (S, n) bool: p < counts[s]). No host sync."""
    mask = sig.mask
    dev, (S, n) = mask.device, mask.shape
    use_index = torch.tensor(by_index, dtype=torch.bool, device=dev).reshape(S, 1)
    by_rank = lex_rank(((~mask).long(), False), (sig.index.to(dev), False))  # real slots by index first
    pos = torch.where(use_index, by_rank, mask.long().cumsum(1) - 1)
    pos = torch.where(mask, pos, n)  # padding slots -> a dump column
    slot = torch.zeros((S, n + 1), dtype=torch.long, device=dev)
    slot.scatter_(1, pos, torch.arange(n, device=dev).expand(S, n))
    real = torch.arange(n, device=dev) < torch.tensor(counts, dtype=torch.long, device=dev).reshape(S, 1)
    return slot[:, :n], real


def to_slots(values: torch.Tensor, slot: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Values in position order (S, n) back in slot order (zero / False on padding slots)."""
    S, n = values.shape
    out = torch.zeros((S, n + 1), dtype=values.dtype, device=values.device)
    out.scatter_(1, torch.where(real, slot, n), torch.where(real, values, torch.zeros_like(values)))
    return out[:, :n]


def lex_rank(*keys: tuple) -> torch.Tensor:
    """Per row, each entry's rank under the lexicographic order of ``keys`` ((B, M) tensor,
    descending) pairs, most significant first; ties broken towards the lower index (stable sorts
    from the least significant key). No host sync."""
    B, M = keys[0][0].shape
    dev = keys[0][0].device
    order = torch.arange(M, device=dev).expand(B, M)
    for key, descending in reversed(keys):
        order = order.gather(1, torch.sort(key.gather(1, order), dim=1, descending=descending, stable=True).indices)
    return torch.empty_like(order).scatter_(1, order, torch.arange(M, device=dev).expand(B, M))


def dpc_knn_batch(x: torch.Tensor, among: torch.Tensor, centres: torch.Tensor, neighbours: torch.Tensor,
                  exact: bool = False) -> tuple:
    """DPC-kNN centres among the tokens ``among`` (B, M) of each row of x (B, M, D), batched:
    distances ``cdist / sqrt(D)`` (float64; ``exact``: without the matmul form); density
    ``exp(-mean of the min(neighbours[b], |among|) smallest squared distances)`` (the token itself
    included); delta the distance to the nearest strictly denser token (the row's largest where
    none); the ``centres[b]`` top ``delta * density`` (ties to the lower index). -> (centre (B, M)
    bool, nearest (B, M) long: the position of each token's nearest centre, ties to the lower).
    Tensor ops only (no host sync)."""
    B, M, D = x.shape
    dev = x.device
    if B == 0 or M == 0:
        return torch.zeros((B, M), dtype=torch.bool, device=dev), torch.zeros((B, M), dtype=torch.long, device=dev)
    xd = x.double()
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist_if_necessary"
    dist = torch.cdist(xd, xd, compute_mode=mode) / math.sqrt(D)
    pair = among.unsqueeze(2) & among.unsqueeze(1)  # (B, M, M)
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dev)
    size = among.sum(dim=1)
    q = neighbours.clamp(max=size).clamp(min=1)  # (B,)
    near = torch.sort(torch.where(pair, dist, inf), dim=-1).values
    used = torch.arange(M, device=dev) < q[:, None, None]
    density = torch.exp(-(torch.where(used, near, 0) ** 2).sum(-1) / q[:, None])
    denser = (density.unsqueeze(1) > density.unsqueeze(2)) & pair  # [b, i, j]: j denser than i
    largest = torch.where(pair, dist, -inf).amax(dim=(1, 2))  # (B,)
    delta = torch.where(denser, dist, largest[:, None, None]).min(-1).values
    score = torch.where(among, delta * density, -inf)
    centre = among & (lex_rank((score, True)) < centres.clamp(max=size).unsqueeze(1))
    nearest = torch.where(centre.unsqueeze(1), dist, inf).argmin(dim=-1)
    return centre, nearest


def frame_means(x: torch.Tensor, real: torch.Tensor, per: torch.Tensor, frames: int) -> tuple:
    """Rows of frame-major tokens x (B, M, D) with ``per`` (B,) tokens a frame (``real`` (B, M)
    marks the real positions): (frame (B, M) long: each position's frame, ``frames`` on padding;
    mean (B, frames + 1, D): each frame's mean token, row ``frames`` a dump). No host sync."""
    B, M, D = x.shape
    frame = torch.where(real, torch.arange(M, device=x.device) // per[:, None], frames)
    sums = torch.zeros((B, frames + 1, D), dtype=x.dtype, device=x.device)
    sums.scatter_add_(1, frame.unsqueeze(-1).expand(B, M, D), x)
    return frame, sums / per[:, None, None]
