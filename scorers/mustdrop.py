"""MustDrop: local spatial merging of similar adjacent visual tokens before the LLM, then text-guided
dual-attention filtering in prefill that never drops a protected key set; followed by its method
preset (the plan builder registered with :func:`vtoken.methods.register_method`).
"""

from __future__ import annotations

import math

import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import layer_indices, register_method, register_scorer
from vtoken.plan import DecodeStage, Stage, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.base import Scorer, Selection, demote, masked_scores, promote, topk_mask
from vtoken.scorers.decode import DecodeScorer
from vtoken.signals import SegmentSignals

_PAPER = ('MustDrop (Liu, Shi, Hong, Hu, Yin, Zhang, "Multi-Stage Vision Token Dropping: Towards Efficient '
          'Multimodal Large Language Model", arXiv:2411.10803, 2024). Released code: '
          "liuting20/MustDrop@909afa5")


def window_groups(grid: tuple, window: int) -> torch.Tensor:
    """Non-overlapping ``window`` x ``window`` windows of a (t, h, w) token grid, tiled per frame from
    the top-left corner; only whole windows (a partial window at the right or bottom edge is none).

    -> (G, window * window) long: the row-major token indices (frame-major, then row, then column)
    of each window's cells, each row in row-major order within its window (the last cell is the
    window's bottom-right token). G = t * (h // window) * (w // window); (0, window**2) when none.
    """
    t, h, w = (int(x) for x in grid)
    gh, gw = h // window, w // window
    if gh == 0 or gw == 0 or t == 0:
        return torch.zeros((0, window * window), dtype=torch.long)
    f = torch.arange(t).view(t, 1, 1, 1, 1)
    r = (torch.arange(gh) * window).view(1, gh, 1, 1, 1) + torch.arange(window).view(1, 1, 1, window, 1)
    c = (torch.arange(gw) * window).view(1, 1, gw, 1, 1) + torch.arange(window).view(1, 1, 1, 1, window)
    idx = f * (h * w) + r * w + c  # (t, gh, gw, window, window)
    return idx.reshape(t * gh * gw, window * window)


def window_similarity(hidden: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the ordered pairs of distinct tokens of each window.

    hidden (G, k, D) -> (G,) float32: sum_{i != j} cos(x_i, x_j) / (k * (k - 1)).
    """
    x = torch.nn.functional.normalize(hidden.float(), dim=-1, eps=1e-8)
    k = x.shape[1]
    sims = x @ x.transpose(1, 2)
    off = sims.sum(dim=(1, 2)) - sims.diagonal(dim1=1, dim2=2).sum(dim=1)
    return off / max(k * (k - 1), 1)


@register_scorer
class MustDropMergeScorer(Scorer):
    """MustDrop's vision stage: local spatial merging. See :func:`mustdrop_plan` for the paper.

    Each image's token grid (``sig.grid``, (t, h, w) from the adapter's layout) is tiled into
    non-overlapping ``window`` x ``window`` windows (3 x 3, the released code's
    ``conditional_pooling(..., (3, 3))``). A window whose mean pairwise cosine similarity
    (:func:`window_similarity` of the tokens' ``hidden`` states) is >= ``threshold`` (0.8) becomes one
    token: its bottom-right token is kept and the other cells are merged into it (``merge_into``; the
    stage runs in ``mode="merge"``, which averages the window's tokens, as the code's size-weighted
    mean of the window). Tokens outside merged windows stay. The count is adaptive (``adaptive``):
    ``count - (window**2 - 1) * merged windows``, capped by the stage budget (the merged tokens are
    then ranked first, then unmerged tokens in slot order).

    Runs before the LLM only (it needs the original grid). A segment with no grid (the adapter
    cannot lay the tokens out on one, e.g. LLaVA-NeXT's anyres tiles with newlines) raises a
    :class:`~vtoken.errors.PruningConfigError`.

    Signals: ``hidden`` (S, n, D), ``grid`` -> Selection with ``merge_into`` (S, n).
    """

    name = "mustdrop_merge"
    needs = frozenset({"hidden"})
    adaptive = True
    pre_llm_only = True
    text_guided = False

    def __init__(self, threshold: float = 0.8, window: int = 3):
        if not -1.0 <= float(threshold) <= 1.0:
            raise PruningConfigError(f"mustdrop merge_threshold is a cosine similarity in [-1, 1]; got {threshold}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise PruningConfigError(f"mustdrop window must be an int >= 2 (3 = 3x3 windows); got {window!r}")
        self.threshold = float(threshold)
        self.window = window

    def merge_plan(self, sig: SegmentSignals) -> tuple:
        """(keep (S, n) bool, merge_into (S, n) long, merged windows (S,) long) before any cap."""
        S, n = sig.mask.shape
        dev = sig.mask.device
        keep = sig.mask.clone()
        merge_into = torch.full((S, n), -1, dtype=torch.long, device=dev)
        windows = torch.zeros(S, dtype=torch.long, device=dev)
        counts = sig.counts.tolist()
        for s in range(S):
            c = int(counts[s])
            grid = sig.grid[s] if sig.grid is not None and s < len(sig.grid) else None
            if grid is None or int(grid[0]) * int(grid[1]) * int(grid[2]) != c or c != int(sig.original[s]):
                raise PruningConfigError(
                    f"scorer 'mustdrop_merge' merges spatially adjacent visual tokens and needs each image's token "
                    f"grid before any pruning; the adapter cannot provide one for segment {s} ({c} tokens, grid "
                    f"{grid}); use an LLM-side method (e.g. fastv) on this model")
            groups = window_groups(grid, self.window).to(dev)  # (G, k) original token indices
            if groups.numel() == 0:
                continue
            slot = torch.full((c,), -1, dtype=torch.long, device=dev)
            slot[sig.index[s, :c].to(dev)] = torch.arange(c, device=dev)
            cells = slot[groups]  # (G, k) slots of each window's cells
            sim = window_similarity(sig.hidden[s][cells])
            hit = sim >= self.threshold
            if not bool(hit.any()):
                continue
            src, dst = cells[hit, :-1], cells[hit, -1:]
            keep[s, src.reshape(-1)] = False
            merge_into[s, src.reshape(-1)] = dst.expand_as(src).reshape(-1)
            windows[s] = int(hit.sum())
        return keep, merge_into, windows

    def select(self, sig: SegmentSignals) -> Selection:
        keep, merge_into, windows = self.merge_plan(sig)
        count = keep.sum(dim=1)
        capped = torch.minimum(count, sig.budget.to(count.device)).clamp(min=1)
        # merged tokens first, then the others in slot order (only matters when the budget caps)
        rank = torch.arange(keep.shape[1], 0, -1, device=keep.device, dtype=torch.float32).expand_as(keep)
        received = torch.zeros(keep.shape, dtype=torch.long, device=keep.device).scatter_add_(
            1, merge_into.clamp(min=0), (merge_into >= 0).long()) > 0
        rank = promote(rank, received & keep, sig.mask)
        rank = demote(rank, ~keep, sig.mask)
        final = topk_mask(rank, sig.mask, capped)
        merge_into = torch.where(~final & sig.mask & (merge_into >= 0) & final.gather(1, merge_into.clamp(min=0)),
                                 merge_into, torch.full_like(merge_into, -1))
        sig.diagnostics["mustdrop_merged_windows"] = windows.clone()
        return Selection(keep=final, scores=masked_scores(rank, sig.mask), merge_into=merge_into)


@register_scorer
class MustDropScorer(Scorer):
    """MustDrop's prefill stage: dual-attention filtering with a protected key set. See
    :func:`mustdrop_plan` for the paper.

    Per segment, with A (T_R, n) the head-averaged attention of the text rows R after the segment's
    visual tokens (``attn_text`` at layer L-1, ``text_after``) to the current candidates:

    * global attention g[v] = sum_{i in R} A[i, v]; individual attention m[v] = max_{i in R} A[i, v];
    * a candidate is dropped when g[v] < ``global_thr`` * sum_u g[u] AND m[v] < ``individual_thr``
      (the released ``dual_attention_filter``); with no row in R nothing is dropped (as the code);
    * the key set is never dropped: the ceil(``key_ratio`` * N) candidates with the highest
      vision-encoder attention (``vision_attn``, [CLS] attention where the tower has one); N is the
      segment's ORIGINAL token count (see the deviations of :func:`mustdrop_plan`); ties go to the
      lower slot (the code's ``torch.topk`` leaves their order unspecified). A segment without
      encoder attention (video: NaN) has no key set.

    The count is adaptive: the survivors, capped by the stage budget and at least 1; when the cap
    bites, the key set ranks first, then the other survivors by global attention (ties: lower slot).
    Counts go to ``sig.diagnostics["mustdrop_count"]`` and key-set sizes to ``["mustdrop_key"]``.

    Signals: ``attn_text`` (S, H, T, n), ``text_after`` (S, T), ``vision_attn`` (S, n).
    """

    name = "mustdrop"
    needs = frozenset({"attn_text", "text_after", "vision_attn"})
    adaptive = True
    text_guided = True

    def __init__(self, global_thr: float = 0.011, individual_thr: float = 0.01, key_ratio: float = 0.08):
        for what, v in (("global_thr", global_thr), ("individual_thr", individual_thr)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise PruningConfigError(f"mustdrop {what} must be a number >= 0; got {v!r}")
        if not isinstance(key_ratio, (int, float)) or isinstance(key_ratio, bool) or not 0.0 <= key_ratio <= 1.0:
            raise PruningConfigError(f"mustdrop key_ratio must lie in [0, 1]; got {key_ratio!r}")
        self.global_thr = float(global_thr)
        self.individual_thr = float(individual_thr)
        self.key_ratio = float(key_ratio)

    def dual_attention(self, sig: SegmentSignals) -> tuple:
        """(g, m): (S, n) global (summed) and individual (max) attention of the rows after the image."""
        rows = sig.text_mask.to(sig.mask.device) & sig.text_after.to(sig.mask.device)  # (S, T)
        a = F.head_mean(sig.attn_text).to(sig.mask.device)  # (S, T, n)
        a = a.clamp(min=0) * rows.unsqueeze(-1) * sig.mask.unsqueeze(1)
        return a.sum(dim=1), a.max(dim=1).values

    def key_set(self, sig: SegmentSignals) -> torch.Tensor:
        """(S, n) bool: the top ceil(key_ratio * original) candidates by ``vision_attn``."""
        va = sig.vision_attn.float().to(sig.mask.device)
        valid = sig.mask & torch.isfinite(va)
        k = torch.ceil(self.key_ratio * sig.original.to(sig.mask.device).double()).long()
        k = torch.minimum(k, valid.sum(dim=1))
        return topk_mask(va, valid, k)

    def select(self, sig: SegmentSignals) -> Selection:
        g, m = self.dual_attention(sig)
        total = g.sum(dim=1, keepdim=True)
        drop = (g < total * self.global_thr) & (m < self.individual_thr)
        key = self.key_set(sig)
        survive = sig.mask & (~drop | key)
        count = torch.minimum(survive.sum(dim=1), sig.budget.to(g.device)).clamp(min=1)
        count = torch.minimum(count, sig.counts.to(g.device))
        rank = demote(promote(g, key, sig.mask), ~survive, sig.mask)
        keep = topk_mask(rank, sig.mask, count)
        sig.diagnostics["mustdrop_count"] = count.clone()
        sig.diagnostics["mustdrop_key"] = key.sum(dim=1)
        return Selection(keep=keep, scores=masked_scores(rank, sig.mask))


#: (global_thr, individual_thr) of the released scripts for LLaVA-1.5-7B, by the average visual
#: tokens they aim at (liuting20/MustDrop@909afa5, scripts/v1_5/eval/textvqa_{192,128,64}.sh)
MUSTDROP_THRESHOLDS = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}
MUSTDROP_REFERENCE_TOKENS = 576


def mustdrop_thresholds(keep) -> tuple:
    """(global_thr, individual_thr) of the released setting whose nominal token count is nearest
    ``keep`` (a float is a fraction of 576; ties go to the larger setting): keep=64 -> (0.011, 0.01),
    128 -> (0.0012, 0.001), 192 and above (keep=1.0 included) -> (0.001, 0.001)."""
    keep = validate_budget(keep)
    tokens = keep if isinstance(keep, int) else keep * MUSTDROP_REFERENCE_TOKENS
    nominal = min(MUSTDROP_THRESHOLDS, key=lambda k: (abs(k - tokens), -k))
    return MUSTDROP_THRESHOLDS[nominal]


@register_method(name="mustdrop", family="attention", paper="Liu et al. 2024 (arXiv:2411.10803)",
                 released_code="liuting20/MustDrop@909afa5",
                 stages="layer 0 (merge); layers 3, 7, 11, 15, adaptive", needs_attention=True, text_guided=True,
                 options=("layers", "global_thr", "individual_thr", "merge_threshold", "window", "key_ratio", "mode"))
def mustdrop_plan(keep=1.0, layers=(3, 7, 11, 15), global_thr=None, individual_thr=None, merge_threshold: float = 0.8,
                  window: int = 3, key_ratio: float = 0.08, mode: str = "select"):
    """MustDrop preset (Liu et al., arXiv:2411.10803; released code liuting20/MustDrop@909afa5):
    its vision-encoding and prefill stages.

    * Stage 1, layer 0, ``mode="merge"`` (:class:`MustDropMergeScorer`): 3 x 3 windows of the
      token grid whose tokens are similar (mean pairwise cosine >= 0.8) become one token each.
    * Stages 2.., at ``layers`` (:class:`MustDropScorer`): dual-attention filtering of the tokens the
      text after the image attends to little, globally (share < ``global_thr``) and individually
      (every row < ``individual_thr``), never dropping the key set (the top 8 % of tokens by
      vision-encoder [CLS] attention). Adaptive counts; ``keep`` caps every LLM stage (1.0: no cap,
      the paper's behaviour).

    Defaults: the released code's. ``layers`` = its ``pruning_layers`` (2, 6, 10, 14) plus one (the
    code filters on the attention OF layer l and prunes its output; vtoken's stage at L reads layer
    L-1 and prunes L's input: the same placement). ``global_thr`` / ``individual_thr`` default to
    the released script nearest ``keep`` (:data:`MUSTDROP_THRESHOLDS`, :func:`mustdrop_thresholds`).

    Tensor shapes: see the two scorers (``hidden`` (S, n, D) and the grid at layer 0;
    ``attn_text`` (S, H, T, n), ``text_after`` (S, T), ``vision_attn`` (S, n) at the LLM stages).

    Deviations:

    * Stage 3 (decode: the output-aware KV-cache policy) is not in this preset: ``mustdrop_kv``
      (:func:`mustdrop_kv_plan`) is this plan plus that policy. This one stays usable on every path
      (no cache, static caches, vLLM), where the policy cannot run.
    * The code merges after the FIRST encoder layer (the later 23 layers run on the merged
      tokens); vtoken merges the projected tokens entering the LLM (the encoder is not modified),
      comparing their LLM-input embeddings (``hidden`` at layer 0) with the same 0.8 threshold.
      Kept tokens keep their original positions: a merged window sits at its bottom-right cell
      (the code moves merged tokens ahead of the others).
    * The code merges the same number of windows in every image of a batch (the minimum over the
      batch); vtoken decides per image (batch 1: identical). Partial windows at the grid's right or
      bottom edge are never merged (the code requires a grid divisible by 3); video frames are
      tiled frame by frame.
    * Key set: the code ranks by [CLS] attention of the LAST encoder layer (index 23) over the
      merged tokens and keeps ceil(0.08 * merged count); vtoken ranks by ``vision_attn`` (the
      adapter's feature layer, LLaVA: penultimate; Qwen-VL: mean attention received; a merged
      token scores as its bottom-right cell) and keeps ceil(0.08 * original count), so that every
      LLM stage re-derives the same set from its own candidates (scorers hold no state).
    * The code keeps zero visual tokens when all fall below both thresholds and has no cap; vtoken
      keeps at least one and at most the stage budget (``keep``).
    * Multi-image samples: each image is a segment filtered against its own total (the code pools
      all images of a sample into one block); the text rows are those after each image.
    """
    layers = layer_indices(layers, "mustdrop layers")
    if global_thr is None or individual_thr is None:
        g, i = mustdrop_thresholds(keep)
        global_thr = g if global_thr is None else global_thr
        individual_thr = i if individual_thr is None else individual_thr
    keep = validate_budget(keep)
    if min(layers) < 1:
        raise PruningConfigError(f"mustdrop layers must be >= 1 (layer 0 is the merge stage); got {layers}")
    merge = Stage(layer=0, scorer=MustDropMergeScorer(threshold=merge_threshold, window=window), keep=1.0,
                  mode="merge")
    scorer = MustDropScorer(global_thr=global_thr, individual_thr=individual_thr, key_ratio=key_ratio)
    return [merge] + [Stage(layer=L, scorer=scorer, keep=keep, mode=mode) for L in layers]


def output_aware_scores(positions: torch.Tensor, output_positions: torch.Tensor) -> torch.Tensor:
    """MustDrop's output-aware cache policy as a score: 1 for each cached slot whose token the
    OUTPUT layer still holds (the last prefill stage's kept set), 0 otherwise.

    positions (B, L) original position of each of a layer's slots (-1 padding); output_positions
    (B, P) original positions of the output layer's slots (-1 padding). -> (B, L) float32."""
    hit = (positions.unsqueeze(-1) == output_positions.unsqueeze(1)) & (output_positions.unsqueeze(1) >= 0)
    return (hit.any(dim=-1) & (positions >= 0)).float()


@register_scorer
class MustDropKVScorer(DecodeScorer):
    """MustDrop's decode stage, the output-aware cache policy (Liu et al., arXiv:2411.10803, §3.4;
    released code liuting20/MustDrop@909afa5, ``modelling_sparse_llama.py``, the "Sparse kv cache
    (decoding stage)" block after the prefill): the layers between the first and the last
    prefill pruning layer cached visual tokens that a LATER prefill stage dropped; the generated
    tokens only need what the output keeps, so every such layer's cache is cut to the tokens that
    survive the last stage (the code composes its per-stage index lists into the final one and
    ``index_select`` s each layer's K / V with it; the layers before the first pruning layer keep
    everything).

    Signals: each layer's slot positions (B, L) and the output layer's (``reference_layer``, -1:
    the last) -> :func:`output_aware_scores`. ``select`` keeps the slots scored 1 (``adaptive``:
    the count is the policy's; ``keep`` only caps it, then the lowest slots win). Reads no
    attention. Deviations: see :func:`mustdrop_kv_plan`."""

    name = "mustdrop_kv"
    reads_attention = False
    reads_layout = True
    adaptive = True
    reference_layer = -1

    def accumulate(self, prev, rows):
        raise PruningConfigError("mustdrop_kv scores from the output layer's kept slots, not from attention rows")

    def score_from_layout(self, positions: torch.Tensor, output_positions: torch.Tensor) -> torch.Tensor:
        return output_aware_scores(positions, output_positions)

    def select(self, scores, mask, budget):
        chosen = mask & (scores > 0)
        return topk_mask(scores, chosen, torch.minimum(budget, chosen.sum(dim=1)))

    def __repr__(self) -> str:
        return "MustDropKVScorer()"


@register_method(name="mustdrop_kv", family="decode", paper="Liu et al. 2024 (arXiv:2411.10803)",
                 released_code="liuting20/MustDrop@909afa5",
                 stages="mustdrop's stages, then decode: layers 2..14 cut to the output's kept set", needs_attention=True,
                 text_guided=True,
                 options=("layers", "global_thr", "individual_thr", "merge_threshold", "window", "key_ratio", "mode"))
def mustdrop_kv_plan(keep=1.0, layers=(3, 7, 11, 15), global_thr=None, individual_thr=None,
                     merge_threshold: float = 0.8, window: int = 3, key_ratio: float = 0.08, mode: str = "select"):
    """MustDrop with all three of its stages (Liu et al., arXiv:2411.10803; released code
    liuting20/MustDrop@909afa5): :func:`mustdrop_plan` (vision-encoding merge, prefill
    dual-attention filtering; same options, same defaults) followed by the decode stage, the
    output-aware cache policy (:class:`MustDropKVScorer`): after the prefill, the KV cache of layers
    ``layers[0] - 1`` .. ``layers[-1] - 1`` (the code's ``pruning_layers`` 2..14: the layers that
    cached visual tokens that stage or a later one dropped) keeps only the visual tokens the output layer holds.

    Why a separate preset: the released code applies the policy in every run, but it makes the
    cache hold fewer tokens than the prefill saw, so decoding with the cache no longer equals
    decoding without it (vtoken invariant 3), and it needs ``generate`` on the dynamic cache
    (``use_cache=False``, static caches, beam search and vLLM are refused, as for every decode-time
    plan). ``mustdrop`` stays the prefill-only plan that runs everywhere.

    Deviations (beyond ``mustdrop``'s): the cut happens before the first decode step (the code cuts
    the cache the prefill forward returns: the same entries); merged tokens (layer 0) are one slot
    each in every layer, so the policy compares slots by original position.
    """
    prefill = mustdrop_plan(keep=keep, layers=layers, global_thr=global_thr, individual_thr=individual_thr,
                            merge_threshold=merge_threshold, window=window, key_ratio=key_ratio, mode=mode)
    first, last = prefill[1].layer - 1, prefill[-1].layer - 1  # the code's pruning_layers[0] .. [-1]
    return prefill + [DecodeStage(scorer=MustDropKVScorer(), keep=1.0, step=0, layers=range(first, last + 1))]


__all__ = ["output_aware_scores", "MustDropKVScorer", "mustdrop_kv_plan", "MustDropMergeScorer", "MustDropScorer", "mustdrop_plan", "mustdrop_thresholds", "window_groups",
           "window_similarity", "MUSTDROP_THRESHOLDS", "MUSTDROP_REFERENCE_TOKENS"]
