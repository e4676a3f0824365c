"""Decode-time scorers: rank the VISUAL entries of a layer's KV cache during ``generate`` from the
attention they have received, accumulated over the prompt's rows and the decode steps, and the
merge rule of a merging method; followed by their method presets (plans of
:class:`vtoken.plan.DecodeStage`, registered with :func:`vtoken.methods.register_method`).

Every function here is pure: the runtime (:mod:`vtoken.hooks.decode_runtime`) feeds them the
attention rows its probes compute (B, q, L) — head-summed softmax rows of the q queries of a call
over the layer's L cached slots, never an N x N matrix at once — and the layer's keys / values, and
applies what they return to the cache.

Shared deviations from the papers (both evict among all cached tokens, per KV head, keeping a
recent window): vtoken evicts only VISUAL entries, text and generated tokens stay; one kept set per
layer and sample (scores summed over the heads), so every head keeps the same slots and the cache
stays one tensor per layer; budgets count per image like every vtoken budget.

Cache on / off: neither method defines a no-cache equivalent (both act on the KV cache itself; a
forward without a cache is the model's own), so ``generate(use_cache=False)`` is refused.
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import register_method, register_scorer
from vtoken.plan import DecodeStage, validate_budget
from vtoken.scorers.base import topk_selection
from vtoken.signals import attention_probs

_A2SF = 'A2SF (Jo & Shin, "A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in Transformer Decoder", arXiv:2407.20485, 2024)'
_LAZYLLM = ('LazyLLM (Fu, Cho, Merth, Mehta, Rastegari, Najibi, "LazyLLM: Dynamic Token Pruning for Efficient Long '
            'Context LLM Inference", arXiv:2407.14057, 2024); no code released')
_LOOKM = ('LOOK-M (Wan, Wu, Zhang, Li, Zhang, Zhang, Wang, "LOOK-M: Look-Once Optimization in KV Cache for Efficient '
          'Multimodal Long-Context Inference", Findings of EMNLP 2024, arXiv:2406.18139). Released code: '
          "SUSTechBruce/LOOK-M@ecf0f51")


def accumulate_scores(prev: Optional[torch.Tensor], rows: torch.Tensor, forgetting: float) -> torch.Tensor:
    """Accumulated attention with a forgetting factor: ``score_t = forgetting * score_{t-1} + attn_t``
    for the q query rows of one call, oldest first.

    prev (B, L0) float or None (nothing accumulated yet), L0 <= L: the slots cached before this call
    (the new ones start at 0); rows (B, q, L) attention of the call's queries over the layer's L
    slots (zero rows for padding queries). -> (B, L) float32:
    ``forgetting**q * prev + sum_i forgetting**(q-1-i) * rows[:, i]``. ``forgetting=1`` is H2O's /
    LOOK-M's plain sum."""
    B, q, L = rows.shape
    weights = forgetting ** torch.arange(q - 1, -1, -1, device=rows.device, dtype=torch.float64)
    current = (rows.float() * weights.to(torch.float32).view(1, q, 1)).sum(dim=1)
    if prev is None:
        return current
    if prev.shape[1] < L:
        prev = torch.cat([prev.float(), prev.new_zeros(B, L - prev.shape[1])], dim=1)
    return prev.float() * (forgetting ** q) + current


def pivot_merge(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor,
                chunk: int = 256) -> tuple:
    """LOOK-M's pivot merge (released code, ``TextPivotMerge_LayerWise``): every evicted entry is
    averaged with the kept entry whose key is most cosine-similar to its own (per KV head), and each
    kept entry becomes the mean of itself and those averages (``scatter_reduce(mean,
    include_self=True)``): ``k_t' = (k_t + sum_{e -> t} (k_e + k_t) / 2) / (1 + #{e -> t})``; values
    follow the keys' assignment.

    keys, values (B, H, L, D); kept, evicted (B, L) bool (disjoint; other slots: padding). ->
    (keys, values) of the same shape, only kept slots changed. Similarities are computed for
    ``chunk`` rows at a time (never L x L at once)."""
    B, H, L, D = keys.shape
    kf = keys.float()
    unit = kf / kf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    target = torch.zeros(B, H, L, dtype=torch.long, device=keys.device)
    allowed = kept.view(B, 1, 1, L)
    for start in range(0, L, chunk):
        sim = unit[:, :, start:start + chunk] @ unit.transpose(-1, -2)  # (B, H, c, L)
        target[:, :, start:start + chunk] = sim.masked_fill(~allowed, float("-inf")).argmax(dim=-1)
    ev = evicted.view(B, 1, L).expand(B, H, L)
    out = []
    for t in (keys, values):
        tf = t.float()
        pivot = tf.gather(2, target.unsqueeze(-1).expand(B, H, L, D))
        merged = ((tf + pivot) / 2) * ev.unsqueeze(-1)
        total = tf.scatter_add(2, target.unsqueeze(-1).expand(B, H, L, D), merged)
        count = torch.ones(B, H, L, device=t.device).scatter_add(2, target, ev.float())
        new = torch.where(kept.view(B, 1, L, 1), total / count.unsqueeze(-1), tf)
        out.append(new.to(t.dtype))
    return out[0], out[1]


class DecodeScorer:
    """Base of the decode-time scorers. ``accumulate`` folds a call's attention rows into a
    layer's running scores, ``select`` keeps the top ``budget`` visual entries per image,
    ``merge`` (merge mode) folds the evicted entries into the kept ones."""

    name: ClassVar[str] = "decode"
    #: reads the attention rows of every query (prompt rows at the prefill, then each decode step)
    reads_attention: ClassVar[bool] = True
    #: has a merge rule (``mode="merge"`` allowed)
    merges: ClassVar[bool] = False
    #: scores entries from the layer's last query (:meth:`score_from_query`) instead of accumulated
    #: rows: the probes keep each layer's last query, and stashed entries can be scored (``readmit``)
    reads_query: ClassVar[bool] = False
    #: scores entries from the slots another layer holds (:meth:`score_from_layout`)
    reads_layout: ClassVar[bool] = False
    #: the kept count is the scorer's (``keep`` only caps it): ``keep=1.0`` may still evict
    adaptive: ClassVar[bool] = False
    forgetting: float = 1.0

    def accumulate(self, prev: Optional[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        return accumulate_scores(prev, rows, self.forgetting)

    def select(self, scores: torch.Tensor, mask: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """scores (S, n) accumulated scores of each image's remaining visual entries, mask (S, n)
        real entries, budget (S,) long -> keep (S, n) bool: the ``min(budget, real)`` highest."""
        return topk_selection(scores, mask, budget).keep

    def merge(self, keys, values, kept, evicted):
        raise PruningConfigError(f"decode scorer {self.name!r} has no merge rule; use mode='evict'")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(forgetting={self.forgetting!r})"


def _check_forgetting(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise PruningConfigError(f"forgetting factor must be a number in (0, 1]; got {value!r}")
    return float(value)


@register_scorer
class A2SFScorer(DecodeScorer):
    """A2SF (Jo & Shin, arXiv:2407.20485): a key's score is its accumulated attention with a
    forgetting factor, ``score_t = forgetting * score_{t-1} + attn_t`` over every query row of the
    prompt and then each decode step, so attention from old queries fades (H2O's plain sum favours
    the earliest tokens); the lowest-scoring visual entries are evicted.

    Signals: rows (B, q, L) head-summed attention of each call's queries (the released code sums
    the query heads of each KV head). ``forgetting`` 0.1 is vtoken's default: the paper tunes the
    factor per model and task (the released configs give one per layer).
    Deviations: see the module docstring (visual entries only, one kept set per layer and sample,
    no recent window)."""

    name = "a2sf"

    def __init__(self, forgetting: float = 0.1):
        self.forgetting = _check_forgetting(forgetting)


def last_query_attention(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """LazyLLM's token importance: the attention the LAST token's query gives each cached key,
    averaged over the query heads, ``s_i = (1/H) sum_h softmax_j(q_h . k_{h,j} * scaling)_i``.

    query (B, H, D) post-RoPE query of each sample's last token at the layer; keys (B, Hkv, L, D)
    post-RoPE cached keys (GQA: each KV head serves H / Hkv query heads); valid (B, L) bool (the
    softmax runs over the valid keys only). -> (B, L) float32, 0 on invalid slots, each row sums
    to 1 where any slot is valid."""
    return attention_probs(query.unsqueeze(2), keys, valid.unsqueeze(1), scaling)[:, :, 0].mean(dim=1) * valid


@register_scorer
class LazyLLMScorer(DecodeScorer):
    """LazyLLM (Fu et al., arXiv:2407.14057): at each pruning point a token's importance is the
    attention the last token gives it at that layer, averaged over heads
    (:func:`last_query_attention`); the kept set is recomputed at every pruning point from the
    kept AND the previously pruned tokens, so a pruned token can be revived (the paper's Aux Cache).
    With ``DecodeStage(readmit=True)`` (the ``lazyllm`` preset) the evicted visual KV entries are
    stashed off the live cache and re-scored with the layer's current query at its next stage;
    re-admitted entries go back, bit for bit, at their original slot order (RoPE is baked into
    cached keys).

    Signals: the layer's last query (B, H, D) post-RoPE, kept by the probes at each call (the last
    valid prompt row at the prefill, the step's token after), and the candidates' keys (B, Hkv, L,
    D). Scores are recomputed at each stage (no accumulation). Deviations: see
    :func:`lazyllm_plan`."""

    name = "lazyllm"
    reads_attention = False
    reads_query = True

    def accumulate(self, prev, rows):
        raise PruningConfigError("lazyllm scores from the layer's last query, not from accumulated rows")

    def score_from_query(self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                         scaling: float) -> torch.Tensor:
        return last_query_attention(query, keys, valid, scaling)

    def __repr__(self) -> str:
        return "LazyLLMScorer()"


@register_scorer
class LookMScorer(DecodeScorer):
    """LOOK-M (Wan et al., Findings of EMNLP 2024, arXiv:2406.18139; released code
    SUSTechBruce/LOOK-M, its default ``text_prior_pivot_merge``): after the prefill, image KV
    entries are evicted first (a text prior: text entries are never evicted), ranked by the
    attention they received summed over every query row and head (H2O's accumulation, no
    forgetting); in merge mode each evicted entry is merged into its most similar kept entry by
    :func:`pivot_merge` (keys' cosine similarity per KV head).

    Signals: rows (B, q, L) head-summed attention rows; keys / values (B, H, L, D) at the merge.
    Deviations: the released code keeps ``hh_ratio`` + ``recent_ratio`` (0.1 + 0.1) of the whole
    prompt per head and, as text has priority, drops images then text; vtoken keeps ``keep`` of each
    image's entries and every text entry, with one kept set per layer (scores summed over heads)."""

    name = "lookm"
    merges = True
    forgetting = 1.0

    def merge(self, keys, values, kept, evicted):
        return pivot_merge(keys, values, kept, evicted)


@register_scorer
class ZipVLKVScorer(DecodeScorer):
    """ZipVL's mixed-precision KV cache (He et al., arXiv:2410.08584, section on decoding): the
    important tokens' KV stays in high precision, the others are kept at a low bit width. Which
    tokens are important follows ZipVL's adaptive ratio: each image's visual entries sorted by
    attention (normalised to sum to 1 over the image), the smallest prefix whose share reaches
    ``threshold`` (0.975, the paper's tau), capped by the stage's budget, at least one.

    Signals: rows (B, q, L) head-summed attention rows, summed over every prompt row (no
    forgetting). Deviations: ZipVL normalises each key's accumulated attention by the number of
    probe queries that see it and picks important tokens among all tokens per layer; vtoken ranks
    visual entries by their summed attention and keeps text in full precision; high precision is
    the model's dtype (ZipVL quantises important tokens too, at a higher bit width); the low-bit
    grid is per token and head, asymmetric min-max (:func:`vtoken.kernels.lowbit.quantize_tokens`), vtoken's choice (no
    code was released)."""

    name = "zipvl_kv"
    forgetting = 1.0

    def __init__(self, threshold: float = 0.975):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise PruningConfigError(f"zipvl_kv threshold must be in (0, 1]; got {threshold!r}")
        self.threshold = float(threshold)

    def select(self, scores, mask, budget):
        s = scores.float().clamp_min(0).masked_fill(~mask, 0.0)
        share = s / s.sum(dim=1, keepdim=True).clamp_min(1e-30)
        order = share.masked_fill(~mask, -1.0).argsort(dim=1, descending=True, stable=True)
        before = share.gather(1, order).cumsum(dim=1) - share.gather(1, order)  # share of the higher-ranked ones
        count = ((before < self.threshold) & mask.gather(1, order)).sum(dim=1)
        count = torch.minimum(count.clamp_min(1), budget).clamp_max(mask.sum(dim=1))
        keep_sorted = torch.arange(mask.shape[1], device=mask.device).view(1, -1) < count.view(-1, 1)
        return torch.zeros_like(mask).scatter(1, order, keep_sorted) & mask

    def __repr__(self) -> str:
        return f"ZipVLKVScorer(threshold={self.threshold!r})"


@register_method(name="a2sf", family="decode", paper="Jo & Shin 2024 (arXiv:2407.20485)",
                 stages="decode, before step `step` (0: after the prefill), every layer", needs_attention=True, text_guided=True,
                 options=("forgetting", "step", "layers", "mode"))
def a2sf_plan(keep, forgetting: float = 0.1, step: int = 0, layers=None, mode: str = "evict"):
    """A2SF preset (arXiv:2407.20485): one :class:`DecodeStage` that evicts each layer's visual KV
    entries down to ``keep`` before decode step ``step``, by attention accumulated with forgetting
    factor ``forgetting`` over the prompt and the steps before it."""
    return [DecodeStage(scorer=A2SFScorer(forgetting), keep=validate_budget(keep), step=step, layers=layers,
                        mode=mode)]


@register_method(name="lookm", family="decode", paper="Wan et al. 2024 (arXiv:2406.18139)",
                 stages="decode, after the prefill, every layer (merge)", needs_attention=True, text_guided=True,
                 released_code="SUSTechBruce/LOOK-M@ecf0f51", options=("step", "layers", "mode"))
def lookm_plan(keep, step: int = 0, layers=None, mode: str = "merge"):
    """LOOK-M preset (arXiv:2406.18139; released default ``text_prior_pivot_merge``): one
    :class:`DecodeStage` that, after the prefill, evicts each layer's lowest-attention visual KV
    entries down to ``keep`` and pivot-merges them into the kept ones (``mode="evict"``: drop only)."""
    return [DecodeStage(scorer=LookMScorer(), keep=validate_budget(keep), step=step, layers=layers, mode=mode)]


@register_method(name="zipvl_kv", family="decode", paper="He et al. 2024 (arXiv:2410.08584)",
                 stages="decode, after the prefill, every layer (mixed-precision KV)", needs_attention=True,
                 text_guided=True, options=("threshold", "bits", "step", "layers"))
def zipvl_kv_plan(keep=1.0, threshold: float = 0.975, bits: int = 2, step: int = 0, layers=None):
    """ZipVL's KV cache compression (arXiv:2410.08584): one :class:`DecodeStage` in ``"quantize"``
    mode; each image's important visual entries (adaptive count, capped by ``keep``) stay in the
    model's dtype, the rest are stored at ``bits`` bits and dequantised when attention reads them."""
    return [DecodeStage(scorer=ZipVLKVScorer(threshold), keep=validate_budget(keep), step=step, layers=layers,
                        mode="quantize", bits=bits)]


@register_method(name="lazyllm", family="decode", paper="Fu et al. 2024 (arXiv:2407.14057)",
                 stages="decode, before steps 0, `every`, 2·`every`, … < `until`: kept ∪ stashed re-ranked, every layer",
                 needs_attention=True, text_guided=True, options=("every", "until", "layers"))
def lazyllm_plan(keep, every: int = 1, until: int = 32, layers=None):
    """LazyLLM preset (Fu et al., arXiv:2407.14057, "LazyLLM: Dynamic Token Pruning for Efficient
    Long Context LLM Inference"; no code released): :class:`DecodeStage` s in ``"evict"`` mode with
    ``readmit=True`` before decode steps 0, ``every``, 2 * ``every``, ... (< ``until``); at each, in
    every chosen layer, each image keeps the ``keep`` visual KV entries the layer's last query
    attends to most (:class:`LazyLLMScorer`), chosen among the entries kept so far AND those evicted
    earlier (stashed off the live cache, so the cache holds ``keep`` entries per image between
    stages); after ``until`` the last kept set stays.

    What translates: the importance score (last token's attention at that layer, averaged over
    heads); the per-step re-selection in which a pruned token can come back (the paper's
    Aux Cache revival); original positions are kept (the re-admitted entries' cached keys carry
    their RoPE).

    Deviations:

    * LazyLLM prunes the prompt's hidden states in the prefill (its main target is time to first
      token) and computes the KV of revived tokens lazily; vtoken's prefill is the plain model's and
      it prunes the cached visual KV entries instead (decode-time memory / bandwidth), so a revived
      entry is the exact KV the prefill computed (LazyLLM recomputes it from the Aux Cache's hidden
      state at the layer where it was pruned).
    * LazyLLM prunes progressively by depth (a top-k percentile at a few layers, more pruned in
      deeper layers, tuned per model; a token pruned at a layer is absent from all later layers);
      vtoken applies one budget, ``keep`` per image, in each chosen layer independently (each layer
      ranks by its own last query). No per-depth schedule: a plan's decode stages have strictly
      increasing steps, so two budgets for two layer groups at one step cannot be expressed yet.
    * Only visual entries are candidates (text and generated tokens always stay); budgets count per
      image (the paper: a percentile over all prompt tokens).
    * The kept set is rebuilt before decode steps ``every`` apart up to ``until`` (the paper: at
      every generation step, for the whole generation); the stashed entries are scored with the
      query of the last call (the token of the previous step), the one available before a step's
      layers run.
    * The stash lives on the cache's device (the paper's Aux Cache holds hidden states in GPU
      memory too).
    """
    keep = validate_budget(keep)
    for name, v in (("every", every), ("until", until)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PruningConfigError(f"lazyllm {name} must be an int >= 1 (decode steps); got {v!r}")
    return [DecodeStage(scorer=LazyLLMScorer(), keep=keep, step=s, layers=layers, mode="evict", readmit=True)
            for s in range(0, until, every)]


__all__ = ["last_query_attention", "LazyLLMScorer", "lazyllm_plan", "ZipVLKVScorer", "zipvl_kv_plan", "accumulate_scores", "pivot_merge", "DecodeScorer", "A2SFScorer", "LookMScorer", "a2sf_plan", "lookm_plan"]
