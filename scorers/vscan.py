"""VScan: complementary global and local scans with token merging at the vision encoder's output,
then text-guided pruning at a middle LLM layer; followed by its method preset (the plan builder
registered with :func:`vtoken.methods.register_method`).

Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language
Models", TMLR 2026 (arXiv:2505.22654). Released code read: github.com/Tencent/SelfEvolvingAgent,
folder ``VScan/``, at commit 5fe6480904bb628ea9e202ed78fb1b48ac765eca (the newest commit touching
it): ``llava/model/llava_arch.py`` (``encode_images``, ``window_cls_selection``,
``token_merging``), ``llava/model/modeling_llama_x.py`` (``layer_prune``) and the Qwen2.5-VL variant
``qwen/model/qwen2_5_vl_custom.py`` / ``qwen2_5_vl_utils.py`` (``window_selection``).

The released rule on one image of n visual tokens with a budget of T tokens at the encoder stage:

1. Local scan: ``int(T / 2)`` tokens (``local_ratio`` = 0.5) spread over the token grid: the grid
   is cut into square windows of ``window`` tokens a side (6 on LLaVA's 24 x 24 grid; 4 on
   Qwen2.5-VL's merged grid), rows and columns past the last whole window belonging to the last
   window; tokens are visited in decreasing encoder attention and taken while their window holds
   fewer than ``ceil(local / windows)`` of them (the Qwen variant's ``window_selection``; on
   LLaVA's grid with ``local`` a multiple of 16 it is the LLaVA variant's top-k per window).
2. Global scan: the other ``T - local`` tokens are the top of the encoder attention among the
   tokens the local scan left.
3. Token merging: every other token is averaged into the kept token whose projected feature is
   most similar to it (cosine; ties to the earliest kept token), with equal weights
   (``scaling = 1``): a kept token becomes the mean of itself and the tokens assigned to it.
4. Middle-layer pruning (layer 16 of LLaVA's 32, 14 of Qwen2.5-VL's 28): the last instruction
   token's attention (heads averaged) ranks the remaining visual tokens; the top ``T2`` are kept
   (the released settings keep a third: 96 -> 32 on LLaVA, 16.7% -> 5.6% on Qwen2.5-VL).

Budgets: ``keep`` is the layer-averaged count of the released settings (96 before the LLM, 32
from layer 16 of 32: 64 on average): the encoder stage keeps ``1.5 * keep``, the middle stage
``0.5 * keep`` (``scale=(1.5, 0.5)``; a fraction is capped at 1.0), which averages to ``keep``
when the middle stage sits halfway up the LLM.

Deviations from the released code:

* Both scans read ``vision_attn``: the [CLS] attention of the penultimate encoder layer on
  LLaVA (the released global scan's source), the mean attention each token receives from the
  last encoder block on Qwen2-VL (the released Qwen variant reads the last block for the global
  scan). The released local scan reads a shallow layer (layer 6 of CLIP's 24, the first
  full-attention block of Qwen2.5-VL); vtoken captures one encoder layer, so the local scan
  ranks with the same attention as the global one, inside windows.
* The window rule is the Qwen variant's greedy capped walk on every model; the LLaVA variant
  (top ``local // 16`` per window) keeps fewer than ``local`` tokens when ``local`` is not a
  multiple of 16. A grid smaller than one window is one window; a segment without a known
  grid (LLaVA-NeXT's anyres image, an already pruned segment) is one window, so the two scans
  together are a top-``T`` of the attention.
* The global scan excludes the local tokens outright (the released code zeroes their attention,
  which lets a zero-attention tie pick one again).
* Ties in the attention ranking break towards the lower token index (stable sorts; the released
  ``argsort`` / ``topk`` leave ties to the backend). Similarities in float32.
* LLaVA-NeXT: the released code scans and merges each crop with the per-crop budget; vtoken
  scans the whole image segment with its budget.
* The middle stage reads layer L-1's last-token attention (``attn_last``) instead of recomputing
  layer L's own projections on the states entering it (as vtoken's PyramidDrop, whose
  ``pdrop_rank_drop`` this stage of the released code is); ``layers=(17,)`` ranks with the
  released layer 16's attention.
* Models: the encoder stage needs vision-encoder attention, which vtoken maps to LLM tokens for
  images of LLaVA-1.5, Qwen2-VL and Qwen3-VL; LLaVA-NeXT / OneVision and Qwen2.5-VL (windowed
  encoder) are refused at ``apply_pruning`` (``PruningConfigError``), though the released code
  covers LLaVA-NeXT and Qwen2.5-VL; a budget that prunes a video is refused likewise.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import layer_indices, register_method, register_scorer
from vtoken.plan import Stage, check_budget_count, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.attention import PyramidDropScorer
from vtoken.scorers.base import Scorer, Selection, masked_scores
from vtoken.signals import SegmentSignals


def _ranked(values: torch.Tensor) -> list:
    """Indices of ``values`` in decreasing order, ties towards the lower index."""
    return torch.sort(values, descending=True, stable=True).indices.tolist()


def local_scan(attn: torch.Tensor, h: int, w: int, count: int, window: int) -> list:
    """The local scan on one image: ``count`` token indices (row-major into an h x w grid) taken in
    decreasing ``attn`` (n,) while their window holds fewer than ``ceil(count / windows)``."""
    nh, nw = max(h // window, 1), max(w // window, 1)
    cap = math.ceil(count / (nh * nw)) if count > 0 else 0
    held = [0] * (nh * nw)
    out = []
    for i in _ranked(attn):
        if len(out) >= count:
            break
        y, x = divmod(i, w)
        cell = min(y // window, nh - 1) * nw + min(x // window, nw - 1)
        if held[cell] < cap:
            held[cell] += 1
            out.append(i)
    return out


def vscan_keep(attn: torch.Tensor, budget: int, grid, local_ratio: float = 0.5, window: int = 6) -> torch.Tensor:
    """VScan's encoder-stage selection on one segment: attn (n,) -> keep (n,) bool with exactly
    ``min(budget, n)`` True. ``grid`` is (h, w) with h * w == n, or None (one window)."""
    n = attn.numel()
    budget = min(int(budget), n)
    h, w = grid if grid is not None else (1, n)
    win = window if grid is not None else max(h, w)
    local = local_scan(attn, h, w, int(budget * local_ratio), win)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[local] = True
    rest = [i for i in _ranked(attn) if not keep[i]]
    keep[rest[: budget - len(local)]] = True
    return keep


def nearest_kept(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """For every token of one segment, the index of the kept token with the most similar feature
    (cosine, ties to the earliest kept token): features (n, D), keep (n,) -> (n,) long, -1 on
    kept tokens."""
    z = F.unit_rows(features)
    kept = torch.nonzero(keep).flatten()
    out = torch.full((keep.numel(),), -1, dtype=torch.long)
    if kept.numel() == 0:
        return out
    best = (z @ z[kept].T).argmax(dim=1).cpu()
    out[~keep] = kept.cpu()[best[~keep]]
    return out


@register_scorer
class VScanScorer(Scorer):
    """VScan's encoder stage (Zhang et al., TMLR 2026, arXiv:2505.22654; released code
    Tencent/SelfEvolvingAgent@5fe6480, ``VScan/``): a local scan (the top tokens of each window
    of the grid by encoder attention) and a global scan (the top tokens of the rest), each
    half the budget; every other token is merged into its most similar kept token
    (``Selection.merge_into``, run the stage with ``mode="merge"``). See the module docstring
    for the rule and every deviation.

    Signals: ``vision_attn`` (S, n), ``hidden`` (S, n, D), ``grid`` -> Selection (exactly
    ``budget`` tokens per segment; ``merge_into`` (S, n)). Scores (heatmaps): the attention.
    """

    name = "vscan"
    needs = frozenset({"vision_attn", "hidden"})
    pre_llm_only = True
    text_guided: ClassVar[bool] = False

    def __init__(self, local_ratio: float = 0.5, window: int = 6):
        if not 0.0 <= local_ratio <= 1.0:
            raise PruningConfigError(f"vscan local_ratio must lie in [0, 1]; got {local_ratio!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise PruningConfigError(f"vscan window must be an int >= 1 (tokens a side); got {window!r}")
        self.local_ratio = float(local_ratio)
        self.window = int(window)

    def select(self, sig: SegmentSignals) -> Selection:
        keep = torch.zeros(sig.mask.shape, dtype=torch.bool)
        merge_into = torch.full(sig.mask.shape, -1, dtype=torch.long)
        attn = sig.vision_attn.float().nan_to_num(0.0).cpu()
        for s in range(sig.num_segments):
            slots = torch.nonzero(sig.mask[s].cpu()).flatten()
            n = slots.numel()
            if n == 0:
                continue
            grid = sig.grid[s] if sig.grid is not None else None
            hw = None
            if grid is not None and grid[0] == 1 and grid[1] * grid[2] == n and n == int(sig.original[s]):
                hw = (int(grid[1]), int(grid[2]))
            index = sig.index[s, slots.to(sig.index.device)].cpu()
            order = torch.argsort(index)  # grid order of the candidates (the original token order)
            slots = slots[order]
            k = vscan_keep(attn[s, slots], int(sig.budget[s]), hw, self.local_ratio, self.window)
            keep[s, slots[k]] = True
            near = nearest_kept(sig.hidden[s, slots.to(sig.hidden.device)], k)
            merge_into[s, slots[~k]] = slots[near[~k]]
        dev = sig.mask.device
        return Selection(keep=keep.to(dev), scores=masked_scores(sig.vision_attn, sig.mask),
                         merge_into=merge_into.to(dev))


def vscan_budgets(keep, scale=(1.5, 0.5), budget: str = "equivalent") -> tuple:
    """(encoder-stage, middle-stage) budgets of the VScan preset. ``budget="equivalent"`` (the
    released settings' convention): ``keep`` is layer-averaged, keep=64 gives the released 96 and
    32; a fraction gives ``min(1, 1.5 * keep)`` and ``0.5 * keep``. ``budget="final"``: the middle
    stage keeps exactly ``keep`` and the encoder stage ``scale[0] / scale[1]`` times as many (the
    same 3 : 1 ratio; ``vtoken eval``'s "Retain N" blocks count final tokens)."""
    keep = validate_budget(keep)
    check_budget_count(budget, "vscan")
    a, b = (float(x) for x in scale)
    if not (a > 0 and b > 0 and b <= a):
        raise PruningConfigError(f"vscan scale must be two positive factors, the second <= the first; got {scale!r}")
    if budget == "final":
        first = max(1, int(round(keep * a / b))) if isinstance(keep, int) else min(1.0, keep * a / b)
        return first, keep
    if isinstance(keep, int):
        return max(1, int(round(keep * a))), max(1, int(round(keep * b)))
    return min(1.0, keep * a), min(1.0, keep * b)


@register_method(name="vscan", family="attention", paper="Zhang et al., TMLR 2026 (arXiv:2505.22654)",
                 stages="layer 0 (global + local scans, merge) and layer 16", needs_attention=True,
                 text_guided=True, options=("layers", "scale", "budget", "local_ratio", "window", "mode"),
                 released_code="Tencent/SelfEvolvingAgent@5fe6480 (VScan/)")
def vscan_plan(keep, layers=(16,), scale=(1.5, 0.5), budget: str = "equivalent", local_ratio: float = 0.5,
               window: int = 6, mode: str = "merge"):
    """VScan preset: the encoder stage (:class:`VScanScorer`, ``mode`` merge) keeping
    ``scale[0] * keep`` tokens, then the last-token-attention stage at ``layers[0]`` (the
    released ``layer_list``: 16 on LLaVA's 32 layers, 14 on Qwen2.5-VL's 28) keeping
    ``scale[1] * keep`` (see :func:`vscan_budgets`; ``budget="final"``: the middle stage keeps
    ``keep``)."""
    layers = layer_indices(layers, "vscan layers")
    if len(layers) != 1 or layers[0] < 1:
        raise PruningConfigError(f"vscan layers must name one LLM layer >= 1 (the middle stage); got {layers!r}")
    first, second = vscan_budgets(keep, scale, budget)
    return [Stage(layer=0, scorer=VScanScorer(local_ratio=local_ratio, window=window), keep=first, mode=mode),
            Stage(layer=layers[0], scorer=PyramidDropScorer(), keep=second)]


__all__ = ["VScanScorer", "vscan_plan", "vscan_keep", "vscan_budgets", "local_scan", "nearest_kept"]
