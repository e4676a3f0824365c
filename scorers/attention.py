"""Attention-based scorers: FastV, SparseVLM, PyramidDrop, FasterVLM (VTC-CLS), VisionZip, ZipVL,
each followed by its method preset (the plan builder registered with
:func:`vtoken.methods.register_method`).

Every scorer here derives from :class:`AttentionScorer` and therefore takes two modifiers (every
attention-ranked preset passes them through: :data:`MODIFIERS`):

* ``debias=True`` -- Attention Debiasing (Zhao et al., "Attention Debiasing for Token Pruning in
  Vision Language Models", arXiv:2508.17807): before ranking, divide each image's attention
  scores by their fitted positional (recency) trend, and suppress the inflated attention on
  padding / empty tokens.
* ``exclude_sinks=True`` -- VAR-style visual sink exclusion (Kang et al., ICLR 2025): tokens with
  massive activations in a few hidden dimensions are ranked below every other token.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import layer_indices, register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.base import Scorer, Selection, demote, masked_scores, topk_selection
from vtoken.signals import SegmentSignals


class AttentionScorer(Scorer):
    """Base of the attention-ranked scorers: :meth:`raw_scores` then the optional modifiers.

    debias:          Attention Debiasing (arXiv:2508.17807). The paper fits an exponential
                     trend of attention vs. token position offline on a dataset and multiplies
                     the attention by its inverse; here the trend is fitted online, per image,
                     by least squares (``debias_trend="exp"`` as in the paper, or ``"linear"``).
                     The paper zeroes attention on the known padding patches of LLaVA's
                     pad-to-square images; here "empty" tokens are detected from the hidden
                     states (many near-identical tokens, :func:`functional.empty_tokens`) and
                     their score is multiplied by ``empty_weight`` (default 0, as in the paper).
                     ``debias_padding=False`` keeps only the positional part (no hidden states).
    exclude_sinks:   rank visual sink tokens (massive activation > ``sink_tau`` times the RMS in
                     one of the sink dimensions, :func:`functional.visual_sinks`) last.
    """

    #: True when the ranking signal depends on the text prompt
    text_guided: ClassVar[bool] = True

    def __init__(
        self,
        debias: bool = False,
        exclude_sinks: bool = False,
        debias_trend: str = "exp",
        debias_padding: bool = True,
        empty_weight: float = 0.0,
        sink_tau: float = 20.0,
    ):
        if debias_trend not in ("exp", "linear"):
            raise ValueError(f"debias_trend must be 'exp' or 'linear'; got {debias_trend!r}")
        self.debias = bool(debias)
        self.exclude_sinks = bool(exclude_sinks)
        self.debias_trend = debias_trend
        self.debias_padding = bool(debias_padding)
        self.empty_weight = float(empty_weight)
        self.sink_tau = float(sink_tau)
        extra = set()
        if (self.debias and self.debias_padding) or self.exclude_sinks:
            extra.add("hidden")
        self.needs = frozenset(type(self).needs | extra)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in ("needs", "optional_needs"))
        return f"{type(self).__name__}({fields})"

    # subclasses implement this: (S, n) float, higher = more important
    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, sig: SegmentSignals) -> torch.Tensor:
        return self.modify(sig, self.raw_scores(sig))

    def modify(self, sig: SegmentSignals, scores: torch.Tensor) -> torch.Tensor:
        """Apply the enabled modifiers to raw scores (S, n)."""
        s = scores.float().masked_fill(~sig.mask, 0.0)
        if self.debias:
            s = F.remove_positional_trend(s, sig.index, sig.mask, kind=self.debias_trend)
            if self.debias_padding and sig.hidden is not None:
                empty = F.empty_tokens(sig.hidden, sig.mask)
                s = torch.where(empty, s * self.empty_weight, s)
                sig.diagnostics["debias_empty"] = empty.sum(dim=1)
        if self.exclude_sinks and sig.hidden is not None:
            sinks = F.visual_sinks(sig.hidden, sig.mask, tau=self.sink_tau)
            s = demote(s, sinks, sig.mask)
            sig.diagnostics["sinks"] = sinks.sum(dim=1)
        return s


#: options every attention-ranked method accepts (the AttentionScorer modifiers)
MODIFIERS = ("debias", "exclude_sinks", "debias_trend", "debias_padding", "empty_weight", "sink_tau")


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
                 stages="layers 8, 16, 24", needs_attention=True, text_guided=True,
                 options=("layers", "lam", "mode") + MODIFIERS)
def pyramiddrop_plan(keep, layers=(8, 16, 24), lam: float = 0.5, mode: str = "select", **modifiers):
    """PyramidDrop preset: stages at ``layers`` with :func:`pyramiddrop_budgets`."""
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
                 paper="Zhang et al. 2024 (arXiv:2412.01818); VTC-CLS (arXiv:2412.05819)",
                 stages="layer 0 (before the LLM)", needs_attention=False, text_guided=False,
                 options=("vision_layers", "mode") + MODIFIERS)
def fastervlm_plan(keep, vision_layers=None, mode: str = "select", **modifiers):
    """FasterVLM / VTC-CLS preset: one stage before the LLM ranked by vision-encoder attention."""
    options = {} if vision_layers is None else {"vision_layers": layer_indices(vision_layers, "fastervlm vision_layers")}
    return [Stage(layer=0, scorer=FasterVLMScorer(**modifiers), keep=validate_budget(keep), mode=mode, options=options)]


@register_scorer
class VisionZipScorer(AttentionScorer):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
    Models", CVPR 2025, arXiv:2412.04467).

    Before the LLM: *dominant* tokens = the top tokens by vision-encoder [CLS] attention
    (penultimate layer, heads summed), and *contextual* tokens: the remaining tokens (in order)
    are split into uniformly strided targets and the rest, and every non-target token is merged
    into the target whose key (``vision_keys``, the encoder's key states, L2-normalised) is most
    similar. 64 tokens = 54 dominant + 10 contextual; in general contextual =
    round(budget * ``contextual_ratio``) with ``contextual_ratio`` = 10/64 (192 -> 162 + 30,
    128 -> 108 + 20), and at least one dominant token.

    The contextual tokens are kept slots (the strided targets) whose hidden state becomes the
    merge of their group: ``Selection.merge_into`` maps every merged token to its target, so the
    stage must run in ``mode="merge"`` (the preset does).

    Deviation: VisionZip sets a contextual token to target + mean(assigned tokens); vtoken's
    merge mode averages the target with its assigned tokens (a weighted mean), which keeps the
    contextual token at the scale of the other tokens.

    Signals: ``vision_attn`` (S, n), ``vision_keys`` (S, n, Dv) -> Selection with merge_into.
    """

    name = "visionzip"
    needs = frozenset({"vision_attn", "vision_keys"})
    pre_llm_only = True
    text_guided = False

    def __init__(self, contextual_ratio: float = 10.0 / 64.0, **modifiers):
        super().__init__(**modifiers)
        if not 0.0 <= contextual_ratio < 1.0:
            raise ValueError(f"contextual_ratio must lie in [0, 1); got {contextual_ratio}")
        self.contextual_ratio = float(contextual_ratio)

    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:
        return sig.vision_attn.float()

    def split(self, budget: int) -> tuple:
        """(dominant, contextual) token counts for a budget."""
        if budget <= 1:
            return budget, 0
        contextual = min(budget - 1, int(round(budget * self.contextual_ratio)))
        return budget - contextual, contextual

    def select(self, sig: SegmentSignals) -> Selection:
        """Vectorised over segments (no host sync, no per-segment loop): the dominant top-k, then
        per segment the remaining candidates' ranks ``r`` (in slot order) become targets where
        ``r % step == 0`` and ``r // step < contextual`` (``step = max(1, remaining // contextual)``:
        the uniformly strided targets), and every other remaining token merges into the target
        with the most similar key (ties: the lowest slot)."""
        scores = self.score(sig)
        S, n = sig.mask.shape
        b = sig.budget.to(torch.float32 if sig.budget.device.type == "mps" else torch.float64)
        contextual = torch.minimum(b - 1, torch.round(b * self.contextual_ratio))
        contextual = torch.where(b <= 1, torch.zeros_like(b), contextual).long()  # = split(budget)[1]
        dominant = topk_selection(scores, sig.mask, sig.budget - contextual)  # masked scores computed once
        keep = dominant.keep
        rest = sig.mask & ~keep
        rank = rest.long().cumsum(1) - 1
        step = (rest.sum(1) // contextual.clamp(min=1)).clamp(min=1).unsqueeze(1)
        target = rest & (rank % step == 0) & (rank // step < contextual.unsqueeze(1))
        others = rest & ~target & target.any(1, keepdim=True)  # no target (contextual 0): plain drop
        nearest = F.masked_max_similarity(F.unit_rows(sig.vision_keys), target)[1]
        merge_into = torch.where(others, nearest, -1)
        return Selection(keep=keep | target, scores=dominant.scores, merge_into=merge_into)


@register_method(name="visionzip", family="attention", paper="Yang et al., CVPR 2025 (arXiv:2412.04467)",
                 stages="layer 0 (before the LLM), merge", needs_attention=False, text_guided=False,
                 options=("dominant", "contextual", "contextual_ratio") + MODIFIERS)
def visionzip_plan(keep, dominant=None, contextual=None, contextual_ratio: float = 10.0 / 64.0, **modifiers):
    """VisionZip preset: one merge stage before the LLM; ``dominant=`` and ``contextual=``
    (e.g. 54 and 10) fix the split and the budget."""
    if (dominant is None) != (contextual is None):
        raise PruningConfigError("visionzip: give both dominant= and contextual= (e.g. 54 and 10), or neither")
    if dominant is not None:
        if int(dominant) < 1 or int(contextual) < 0:
            raise PruningConfigError(f"visionzip: need dominant >= 1 and contextual >= 0; got {dominant}, {contextual}")
        keep = int(dominant) + int(contextual)
        contextual_ratio = int(contextual) / keep
    scorer = VisionZipScorer(contextual_ratio=contextual_ratio, **modifiers)
    return [Stage(layer=0, scorer=scorer, keep=validate_budget(keep), mode="merge")]


@register_scorer
class ZipVLScorer(AttentionScorer):
    """ZipVL (He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token
    Sparsification", arXiv:2410.08584).

    Adaptive budget: the visual tokens are sorted by normalised attention (heads averaged, the
    segment's scores normalised to sum to 1) and the smallest prefix whose cumulative share
    reaches ``threshold`` is kept: p = min{p : sum_{j<=p} a_sorted(j) >= threshold}. Concentrated
    attention keeps few tokens, spread attention keeps many.

    Defaults and deviations:
    * ``threshold`` = 0.975 (the paper's tau for attention-score coverage; configurable).
    * The stage's ``keep`` is a cap: the count chosen never exceeds the stage budget, and is at
      least 1. Use ``keep=1.0`` for the fully adaptive behaviour of the paper.
    * ZipVL decides a ratio per layer from probe queries and applies it to sparse attention and
      KV eviction at every layer; vtoken applies it once, as a token-dropping stage at layer K,
      with the last prompt token's attention row as the probe.
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


@register_method(name="zipvl", family="attention", paper="He et al. 2024 (arXiv:2410.08584)",
                 stages="layer K=2, adaptive count", needs_attention=True, text_guided=True,
                 options=("K", "threshold", "mode") + MODIFIERS)
def zipvl_plan(keep=1.0, K: int = 2, threshold: float = 0.975, mode: str = "select", **modifiers):
    """ZipVL preset: one adaptive stage at layer ``K``; ``keep`` caps the count."""
    return [Stage(layer=K, scorer=ZipVLScorer(threshold=threshold, **modifiers), keep=validate_budget(keep), mode=mode)]


@register_scorer
class SparseVLMScorer(AttentionScorer):
    """SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient
    Vision-Language Model Inference", ICML 2025, arXiv:2410.04417).

    Text "raters": the relevance of each text token to the image is the softmax (over text
    tokens) of visual-text similarity, averaged over the visual tokens; the raters are the text
    tokens whose relevance is above the mean. A visual token's score is the attention the
    raters' rows pay to it at layer L-1, averaged over heads and raters. The preset prunes
    progressively at layers 2, 6 and 15 with the paper's budget tables.

    ``recycle=True`` (v1's token recycling): of the tokens a stage deletes, the top
    ``recycle_ratio`` (30%) by score are clustered (density-peaks kNN clustering, int(r/10)+1
    clusters) and each cluster is merged into one token. In vtoken the cluster centre is a kept
    slot of the stage's budget whose hidden state becomes the mean of its cluster
    (``Selection.merge_into``; the stage runs in ``mode="merge"``), so budgets stay exact.

    Deviations:
    * The official code computes the raters once, from the LLM's input embeddings of the text
      after the image; vtoken recomputes them at each stage from the hidden states entering it
      and uses all text tokens of the sample. The similarity is taken between RMS-normalised
      hidden states scaled by 1/sqrt(D) (at deeper layers raw dot products are dominated by
      massive activations).
    * The official recycling appends the merged tokens as extra tokens with renumbered
      positions; vtoken keeps each merged token at its centre's original position.
    * The adaptive rank-based deletion count of the paper is disabled in its released code;
      the budget tables are used, as there.

    Signals: ``attn_text`` (S, H, T, n), ``hidden`` (S, n, D), ``text_hidden`` (S, T, D).
    """

    name = "sparsevlm"
    needs = frozenset({"attn_text", "hidden", "text_hidden"})

    def __init__(self, recycle: bool = False, recycle_ratio: float = 0.3, cluster_ratio: float = 0.1, **modifiers):
        super().__init__(**modifiers)
        self.recycle = bool(recycle)
        self.recycle_ratio = float(recycle_ratio)
        self.cluster_ratio = float(cluster_ratio)

    def raters(self, sig: SegmentSignals) -> torch.Tensor:
        """(S, T) bool: text rows whose relevance to the image is above the mean."""
        tmask = sig.text_mask if sig.text_mask is not None else torch.ones(sig.text_hidden.shape[:2], dtype=torch.bool,
                                                                            device=sig.mask.device)
        if sig.text_hidden.shape[1] == 0:
            return tmask
        v = F.rms_normalize(sig.hidden)
        t = F.rms_normalize(sig.text_hidden)
        logits = (v @ t.transpose(1, 2)) / math.sqrt(v.shape[-1])  # (S, n, T)
        logits = logits.masked_fill(~tmask.unsqueeze(1), float("-inf"))
        rel = torch.softmax(logits, dim=2).nan_to_num(0.0)  # (S, n, T)
        vm = sig.mask.float().unsqueeze(-1)
        rel = (rel * vm).sum(dim=1) / vm.sum(dim=1).clamp(min=1)  # (S, T)
        tcount = tmask.float().sum(dim=1, keepdim=True).clamp(min=1)
        mean = (rel * tmask).sum(dim=1, keepdim=True) / tcount
        raters = (rel > mean) & tmask
        none = ~raters.any(dim=1, keepdim=True)
        return torch.where(none, tmask, raters)

    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:
        r = self.raters(sig).float()  # (S, T)
        sig.diagnostics["raters"] = r.sum(dim=1).long()
        att = sig.attn_text.float().mean(dim=1)  # (S, T, n)
        return (att * r.unsqueeze(-1)).sum(dim=1) / r.sum(dim=1, keepdim=True).clamp(min=1)

    def select(self, sig: SegmentSignals) -> Selection:
        scores = self.score(sig)
        if not self.recycle:
            return topk_selection(scores, sig.mask, sig.budget)
        S, n = sig.mask.shape
        keep = torch.zeros_like(sig.mask)
        merge_into = torch.full((S, n), -1, dtype=torch.long, device=sig.mask.device)
        ms = masked_scores(scores, sig.mask)
        recycled = torch.zeros(S, dtype=torch.long, device=sig.mask.device)
        for s in range(S):
            count, k = int(sig.mask[s].sum()), int(sig.budget[s])
            order = torch.sort(ms[s], descending=True, stable=True).indices[:count]
            deleted = count - k
            if deleted <= 0 or k < 2:
                keep[s, order[:k]] = True
                continue
            # paper: pool = top 30% (+1) of the deleted tokens, int(pool / 10) + 1 clusters
            pool_size = int(deleted * self.recycle_ratio) + 1
            clusters = max(1, min(int(pool_size * self.cluster_ratio) + 1, k - 1, pool_size))
            plain = k - clusters
            keep[s, order[:plain]] = True
            rest = order[plain:]  # deleted + clusters tokens, best first
            pool = rest[: max(clusters, min(rest.numel(), int(rest.numel() * self.recycle_ratio) + 1))]
            centres, assign = F.dpc_knn(sig.hidden[s, pool], clusters)
            keep[s, pool[centres]] = True
            members = torch.ones(pool.numel(), dtype=torch.bool, device=pool.device)
            members[centres] = False
            merge_into[s, pool[members]] = pool[centres][assign[members]]
            recycled[s] = clusters
        sig.diagnostics["recycled_clusters"] = recycled
        return Selection(keep=keep, scores=ms, merge_into=merge_into)


#: SparseVLM's released budget tables (LLaVA-1.5, 576 visual tokens): visual tokens kept after
#: each of its three pruning layers, for the nominal budgets 192 / 128 / 64 (the nominal budget
#: is the layer-averaged count, e.g. (2*576 + 4*300 + 10*200 + 16*110) / 32 = 191).
SPARSEVLM_TABLES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
SPARSEVLM_REFERENCE_TOKENS = 576


def sparsevlm_budgets(keep, budget: str = "equivalent") -> tuple:
    """Per-stage budgets of the SparseVLM preset for ``keep``.

    ``budget="equivalent"`` (default, the paper's convention): ``keep`` is the nominal,
    layer-averaged budget; the table of the nearest nominal budget (192 / 128 / 64, as a
    fraction of 576 for float budgets) is scaled by keep / nominal. So keep=64 gives the paper's
    (66, 30, 17) and keep=96 gives (227, 82, 27) (ties go to the larger table).
    ``budget="final"``: the table is scaled so that the LAST stage keeps exactly ``keep``.
    """
    keep = validate_budget(keep)
    if budget not in ("equivalent", "final"):
        raise PruningConfigError(f"sparsevlm budget must be 'equivalent' or 'final'; got {budget!r}")
    ref = SPARSEVLM_REFERENCE_TOKENS
    as_tokens = keep if isinstance(keep, int) else keep * ref
    if budget == "equivalent":
        nominal = min(SPARSEVLM_TABLES, key=lambda k: (abs(k - as_tokens), -k))
        factor = as_tokens / nominal
    else:
        nominal = min(SPARSEVLM_TABLES, key=lambda k: (abs(SPARSEVLM_TABLES[k][-1] - as_tokens), -k))
        factor = as_tokens / SPARSEVLM_TABLES[nominal][-1]
    raw = [x * factor for x in SPARSEVLM_TABLES[nominal]]
    if isinstance(keep, int):
        out = [max(1, int(round(x))) for x in raw]
        if budget == "final":
            out[-1] = keep
    else:
        out = [min(1.0, max(1e-6, x / ref)) for x in raw]
        if budget == "final":
            out[-1] = keep
    for i in range(1, len(out)):  # never grow from stage to stage
        out[i] = min(out[i], out[i - 1])
    return tuple(out)


@register_method(name="sparsevlm", family="attention", paper="Zhang et al., ICML 2025 (arXiv:2410.04417)",
                 stages="layers 2, 6, 15", needs_attention=True, text_guided=True,
                 options=("layers", "recycle", "budget", "mode", "recycle_ratio", "cluster_ratio") + MODIFIERS)
def sparsevlm_plan(keep, layers=(2, 6, 15), recycle: bool = False, budget: str = "equivalent", mode=None,
                   recycle_ratio: float = 0.3, cluster_ratio: float = 0.1, **modifiers):
    """SparseVLM preset: stages at ``layers`` (the paper's pruning layers 2, 6, 15) with the
    budgets of :func:`sparsevlm_budgets`; ``recycle=True`` runs the stages in merge mode.

    The official code scores with the attention OF layer l and drops tokens from its output
    (entering l+1); vtoken's stage at layer L scores with layer L-1's attention and prunes the
    input of layer L, so ``layers=(3, 7, 16)`` reproduces the code's placement exactly, while
    the default keeps the paper's numbers.
    """
    layers = layer_indices(layers, "sparsevlm layers")
    budgets = sparsevlm_budgets(keep, budget)
    if len(layers) != len(budgets):
        raise PruningConfigError(f"sparsevlm has {len(budgets)} stages; got layers={layers}")
    mode = mode or ("merge" if recycle else "select")
    scorer = SparseVLMScorer(recycle=recycle, recycle_ratio=recycle_ratio, cluster_ratio=cluster_ratio, **modifiers)
    return [Stage(layer=L, scorer=scorer, keep=b, mode=mode) for L, b in zip(layers, budgets)]


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
    "sparsevlm_plan",
    "sparsevlm_budgets",
    "SPARSEVLM_TABLES",
    "SPARSEVLM_REFERENCE_TOKENS",
]
