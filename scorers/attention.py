"""Attention-ranked scorers that keep the top tokens of one attention signal: FastV, PyramidDrop,
FasterVLM (VTC-CLS), ZipVL (adaptive count), each followed by its method preset (the plan builder
registered with :func:`vtoken.methods.register_method`).

They derive from :class:`~vtoken.scorers.attention_base.AttentionScorer` and so take its modifiers
``debias=True`` and ``exclude_sinks=True`` (:data:`MODIFIERS`). The other attention-based methods
have their own modules: VisionZip (:mod:`vtoken.scorers.visionzip`) and SparseVLM
(:mod:`vtoken.scorers.sparsevlm`); their public names, the base and the modifiers are re-exported
here.
"""

from __future__ import annotations

import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import layer_indices, register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.attention_base import MODIFIERS, AttentionScorer
from vtoken.scorers.base import Selection, topk_selection
from vtoken.scorers.sparsevlm import (  # noqa: F401  (re-exported)
    SPARSEVLM_REFERENCE_TOKENS,
    SPARSEVLM_TABLES,
    SparseVLMScorer,
    sparsevlm_budgets,
    sparsevlm_plan,
)
from vtoken.scorers.visionzip import VisionZipScorer, visionzip_plan  # noqa: F401  (re-exported)
from vtoken.signals import SegmentSignals


@register_scorer
class FastVScorer(AttentionScorer):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv:2403.06764).

    At layer K (default 2) each visual token is scored by the attention it receives from the
    last (prompt) token in layer K-1, averaged over heads; the top tokens are kept with their
    original positions.

    Signals: ``attn_last`` (S, H, n) -> scores (S, n).
    """

    name = "fastv"
    needs = frozenset({"attn_last"})

    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:
        return F.head_mean(sig.attn_last)


@register_method(name="fastv", family="attention", paper="Chen et al., ECCV 2024 (arXiv:2403.06764)",
                 released_code="pkunlp-icler/FastV@d165972",
                 stages="layer K=2", needs_attention=True, text_guided=True, options=("K", "mode") + MODIFIERS)
def fastv_plan(keep, K: int = 2, mode: str = "select", **modifiers):
    """FastV preset: one stage at layer ``K`` keeping ``keep`` visual tokens per image."""
    return [Stage(layer=K, scorer=FastVScorer(**modifiers), keep=validate_budget(keep), mode=mode)]


@register_scorer
class PyramidDropScorer(AttentionScorer):
    """PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
    Pyramid Visual Redundancy Reduction", CVPR 2025, arXiv:2410.17247).

    At the end of each stage (after layers 8, 16, 24 of a 32-layer LLM) the visual tokens are
    ranked by the attention of the last instruction token's query (with RoPE) to them, averaged
    over heads, and a fraction lambda = 0.5 of the remaining ones is kept.

    Deviation: the paper computes that row with the projections of the first layer of the next
    stage (layer L) on the hidden states entering it; vtoken reads the same row from layer L-1,
    the last layer that ran on the full token set (``attn_last``), so no extra projection runs.
    Given the same row, the kept sets equal the released code's (Cooperx521/PyramidDrop@6444f30,
    ``pdrop_rank_drop``; ``tests/test_fidelity_pyramiddrop.py``); its per-stage counts are
    int(N * 0.5 / 0.25 / 0.125) of each image's N tokens, which fractional budgets reproduce up
    to rounding (vtoken rounds to nearest, the code floors).

    Signals: ``attn_last`` (S, H, n) -> scores (S, n).
    """

    name = "pyramiddrop"
    needs = frozenset({"attn_last"})

    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:
        return F.head_mean(sig.attn_last)


def pyramiddrop_budgets(keep, stages: int = 3, lam: float = 0.5) -> tuple:
    """Per-stage budgets of the PyramidDrop preset: each stage keeps ``lam`` of the previous
    one and the LAST stage keeps exactly ``keep``: keep / lam**(stages-1), ..., keep / lam, keep.

    With lam = 0.5: keep=72 of 576 gives the paper's 288 / 144 / 72 (its 50% / 25% / 12.5%);
    keep=64 gives 256 / 128 / 64; a float keep=0.125 gives 0.5 / 0.25 / 0.125. A stage whose
    budget exceeds an image's tokens keeps the image whole (so the first halvings may be no-ops
    for small images).
    """
    keep = validate_budget(keep)
    if not 0.0 < lam <= 1.0:
        raise PruningConfigError(f"pyramiddrop lam must lie in (0, 1]; got {lam}")
    out = []
    for i in range(stages):
        x = keep / lam ** (stages - 1 - i)
        out.append(max(1, int(round(x))) if isinstance(keep, int) else min(1.0, x))
    return tuple(out)


@register_method(name="pyramiddrop", family="attention", paper="Xing et al., CVPR 2025 (arXiv:2410.17247)",
                 released_code="Cooperx521/PyramidDrop@6444f30",
                 stages="layers 8, 16, 24", needs_attention=True, text_guided=True,
                 options=("layers", "lam", "mode") + MODIFIERS)
def pyramiddrop_plan(keep, layers=(8, 16, 24), lam: float = 0.5, mode: str = "select", **modifiers):
    """PyramidDrop preset: stages at ``layers`` with :func:`pyramiddrop_budgets`.

    The released code ranks with layer L's own query and keys (recomputed on the hidden states
    entering L) and prunes before layer L runs; vtoken's stage at L reads layer L-1's row. So
    ``layers=(9, 17, 25)`` ranks with the same layers' attention as the code (layers 8, 16 and
    24 then run once more on the unpruned set)."""
    layers = layer_indices(layers, "pyramiddrop layers")
    scorer = PyramidDropScorer(**modifiers)
    return [Stage(layer=L, scorer=scorer, keep=b, mode=mode)
            for L, b in zip(layers, pyramiddrop_budgets(keep, len(layers), lam))]


@register_scorer
class FasterVLMScorer(AttentionScorer):
    """FasterVLM / VTC-CLS (Zhang et al., "[CLS] Attention is All You Need for Training-Free
    Visual Token Pruning: Make VLM Inference Faster", arXiv:2412.01818; VTC-CLS: Wang et al.,
    "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs", arXiv:2412.05819).

    Before the LLM, each visual token is scored by the attention the vision encoder's [CLS]
    token pays to its patch (penultimate encoder layer, heads averaged), text-agnostic. For
    encoders without [CLS] (Qwen-VL) the runtime provides the mean attention each patch receives.
    VTC-CLS averages [CLS] attention over several encoder layers: that choice is the runtime's
    (the stage option ``vision_layers`` asks for it); the scorer only ranks ``vision_attn``.

    Signals: ``vision_attn`` (S, n) -> scores (S, n).
    """

    name = "fastervlm"
    needs = frozenset({"vision_attn"})
    pre_llm_only = True
    text_guided = False

    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:
        return sig.vision_attn.float()


@register_method(name="fastervlm", family="attention",
                 released_code="Theia-4869/FasterVLM@f5d5f12",
                 paper="Zhang et al. 2024 (arXiv:2412.01818); VTC-CLS (arXiv:2412.05819)",
                 stages="layer 0 (before the LLM)", needs_attention=False, text_guided=False,
                 options=("vision_layers", "mode") + MODIFIERS)
def fastervlm_plan(keep, vision_layers=None, mode: str = "select", **modifiers):
    """FasterVLM / VTC-CLS preset: one stage before the LLM ranked by vision-encoder attention."""
    options = {} if vision_layers is None else {"vision_layers": layer_indices(vision_layers, "fastervlm vision_layers")}
    return [Stage(layer=0, scorer=FasterVLMScorer(**modifiers), keep=validate_budget(keep), mode=mode, options=options)]

@register_scorer
class ZipVLScorer(AttentionScorer):
    """ZipVL (He, Chen, Liu, Shao, Zhou, Zhang, Zhuang, "ZipVL: Efficient Large Vision-Language Models
    with Dynamic Token Sparsification", arXiv:2410.08584, 2024).

    Adaptive budget from one layer's attention distribution: the visual tokens are sorted by
    normalised attention (heads averaged, the segment's scores normalised to sum to 1) and the
    smallest prefix whose cumulative share reaches ``threshold`` is kept:
    p = min{p : sum_{j<=p} a_sorted(j) >= threshold}. Concentrated attention keeps few tokens,
    spread attention keeps many. The ratio p / n is therefore decided per layer and per image.

    The preset (:func:`zipvl_plan`) runs it once at layer K (``per_layer=False``, the default) or,
    as the paper, at every layer from K on (``per_layer=True``): each layer's own attention
    distribution decides that layer's ratio of important tokens among the tokens still there.

    Defaults and deviations:
    * ``threshold`` = 0.975 (the paper's tau for attention-score coverage; configurable).
    * The stage's ``keep`` is a cap: the count chosen never exceeds the stage budget, and is at
      least 1. Use ``keep=1.0`` for the fully adaptive behaviour of the paper.
    * The probe: ZipVL estimates each layer's attention from probe queries (recent and random
      tokens) and scores keys by accumulated attention normalised by the number of queries that
      see them, over all tokens; vtoken takes the last prompt token's attention row (one probe
      query, so the normalisation is a no-op) over the segment's visual candidates, at layer L-1
      for the stage at L (the last layer that ran on the unpruned set).
    * ZipVL computes each layer's attention on that layer's important tokens only (the others
      stay in the residual stream and may be important again at a later layer) and evicts the
      unimportant ones from that layer's KV cache; vtoken drops them from the layer on (each
      per-layer stage chooses among the survivors of the previous one), which is what makes its
      speedup real with ordinary attention kernels.
    * Mixed-precision KV cache in decode (important tokens high-bit, the rest low-bit) is the
      separate decode-time method ``zipvl_kv`` (:class:`vtoken.scorers.decode.ZipVLKVScorer`); in
      this prefill method the kept tokens' cache stays in the model's dtype, dropped ones are gone.
    * No selection code has been released (the authors' page, hexy.tech/zipvl, links none), so
      the rule is held to the paper's equation only, not to code.
    The counts chosen go to ``sig.diagnostics["zipvl_count"]`` (S,) (and to handle.stats).

    Signals: ``attn_last`` (S, H, n) -> Selection with a per-segment count <= budget.
    """

    name = "zipvl"
    needs = frozenset({"attn_last"})
    adaptive = True

    def __init__(self, threshold: float = 0.975, **modifiers):
        super().__init__(**modifiers)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1]; got {threshold}")
        self.threshold = float(threshold)

    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:
        return F.head_mean(sig.attn_last)

    def select(self, sig: SegmentSignals) -> Selection:
        scores = self.score(sig)
        count = F.cumulative_share_count(scores, sig.mask, self.threshold)
        count = torch.minimum(count, sig.budget.to(count.device)).clamp(min=1)
        count = torch.minimum(count, sig.counts)
        sig.diagnostics["zipvl_count"] = count.clone()
        return topk_selection(scores, sig.mask, count)


def zipvl_layers(K: int, num_layers: int) -> tuple:
    """The layers of per-layer ZipVL: every decoder layer from ``K`` to ``num_layers - 1``."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
        raise PruningConfigError(f"zipvl num_layers must be the model's decoder-layer count (an int >= 2); got "
                                 f"{num_layers!r}")
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K < num_layers:
        raise PruningConfigError(f"zipvl K must lie in 1..{num_layers - 1} for a {num_layers}-layer model; got {K!r}")
    return tuple(range(K, num_layers))


@register_method(name="zipvl", family="attention", paper="He et al. 2024 (arXiv:2410.08584)",
                 released_code="none released (paper's equation)",
                 stages="layer K=2, adaptive count (per_layer=True: every layer from K)", needs_attention=True,
                 text_guided=True, options=("K", "threshold", "per_layer", "num_layers", "mode") + MODIFIERS)
def zipvl_plan(keep=1.0, K: int = 2, threshold: float = 0.975, per_layer: bool = False, num_layers=None,
               mode: str = "select", **modifiers):
    """ZipVL preset; ``keep`` caps every stage's count.

    ``per_layer=False`` (default): one adaptive stage at layer ``K``. ``per_layer=True`` (the paper's
    layer-wise ratio): one adaptive stage at every layer K, K+1, ..., ``num_layers - 1``, each with
    its own layer's attention (:func:`zipvl_layers`). ``num_layers`` is the model's decoder-layer
    count: :func:`vtoken.apply_pruning` fills it from the model; :func:`vtoken.build_plan` needs it.
    """
    scorer = ZipVLScorer(threshold=threshold, **modifiers)
    keep = validate_budget(keep)
    if not per_layer:
        return [Stage(layer=K, scorer=scorer, keep=keep, mode=mode)]
    if num_layers is None:
        raise PruningConfigError("zipvl per_layer=True needs num_layers (the model's decoder-layer count); "
                                 "apply_pruning fills it from the model, build_plan needs it given")
    return [Stage(layer=L, scorer=scorer, keep=keep, mode=mode) for L in zipvl_layers(K, num_layers)]


__all__ = [
    "AttentionScorer",
    "FastVScorer",
    "PyramidDropScorer",
    "FasterVLMScorer",
    "VisionZipScorer",
    "ZipVLScorer",
    "SparseVLMScorer",
    "MODIFIERS",
    "fastv_plan",
    "pyramiddrop_plan",
    "pyramiddrop_budgets",
    "fastervlm_plan",
    "visionzip_plan",
    "zipvl_plan",
    "zipvl_layers",
    "sparsevlm_plan",
    "sparsevlm_budgets",
    "SPARSEVLM_TABLES",
    "SPARSEVLM_REFERENCE_TOKENS",
]
