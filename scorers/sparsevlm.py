"""SparseVLM: visual tokens ranked by the attention of text "raters", pruned progressively with the
paper's budget tables, optionally recycling pruned tokens by clustering (v1); followed by its
budget tables and its method preset (the plan builder registered with
:func:`vtoken.methods.register_method`).
"""

from __future__ import annotations

import math

import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import layer_indices, register_method, register_scorer
from vtoken.plan import Stage, scaled_table_budgets, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.attention_base import MODIFIERS, AttentionScorer
from vtoken.scorers.base import Selection, masked_scores, topk_selection
from vtoken.signals import SegmentSignals


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
    * Counts: the current released code (Gumpest/SparseVLMs@26a5f48, ``attn_postprocess_topk``)
      takes the budget tables' counts, as vtoken's default does. The first release (up to
      @b72c5d6, Oct 2024, ``attn_postprocess_rank``) used the paper's rank-adaptive count:
      min(int(rank(R) * scale + bias), count - 1), R the raters x visual matrix of head-mean
      attention (``torch.linalg.matrix_rank``, default tolerance), nothing pruned when R has
      full column rank; scale 13.5 (its MME script; 9 for POPE, 0.8 for TextVQA), bias 0.
      ``rank_count=True`` (off by default; the preset's ``budget="rank"``) computes that count,
      capped by the stage budget and at least 1 (the scorer is then ``adaptive``).
    * The released code keeps ``min(budget, count - 1)`` tokens (always dropping one); vtoken
      keeps exactly ``min(budget, count)``.
    * Recycling (vtoken's exact-budget form, checked by ``tests/test_fidelity_sparsevlm.py``):
      with d = count - k deleted tokens the code's cluster count c = int((int(0.3 d) + 1) / 10)
      + 1 is kept; the k - c best tokens are kept plainly, the pool is the next
      int(0.3 (d + c)) + 1 tokens by score, and the code's DPC-kNN (k = c neighbours, distances
      over sqrt(D)) picks the c centres among them; the code's random 1e-6 density noise is
      replaced by a deterministic index tie-break.

    ``raters="released"`` (off by default) computes the raters as the released code does:
    raw dot products of visual and text hidden states (no normalisation, no scaling), softmax
    over the text rows AFTER the image only (signal ``text_after``), raters = relevance above the
    mean of those rows. It still reads the hidden states entering each stage (the code reads the
    LLM's input embeddings once, which a stage at layer L >= 1 does not receive).

    Signals: ``attn_text`` (S, H, T, n), ``hidden`` (S, n, D), ``text_hidden`` (S, T, D).
    """

    name = "sparsevlm"
    needs = frozenset({"attn_text", "hidden", "text_hidden"})

    def __init__(self, recycle: bool = False, recycle_ratio: float = 0.3, cluster_ratio: float = 0.1,
                 raters: str = "normalized", rank_count: bool = False, rank_scale: float = 13.5,
                 rank_bias: float = 0.0, **modifiers):
        super().__init__(**modifiers)
        self.rank_count = bool(rank_count)
        self.rank_scale = float(rank_scale)
        self.rank_bias = float(rank_bias)
        if self.rank_count:
            self.adaptive = True
        if raters not in ("normalized", "released"):
            raise PruningConfigError(f"sparsevlm raters must be 'normalized' or 'released'; got {raters!r}")
        self.rater_rule = raters
        if raters == "released":
            self.needs = frozenset(self.needs | {"text_after"})
        self.recycle = bool(recycle)
        self.recycle_ratio = float(recycle_ratio)
        self.cluster_ratio = float(cluster_ratio)

    def raters(self, sig: SegmentSignals) -> torch.Tensor:
        """(S, T) bool: text rows whose relevance to the image is above the mean."""
        tmask = sig.text_mask if sig.text_mask is not None else torch.ones(sig.text_hidden.shape[:2], dtype=torch.bool,
                                                                            device=sig.mask.device)
        if self.rater_rule == "released" and sig.text_after is not None:
            tmask = tmask & sig.text_after.to(tmask.device)
        if sig.text_hidden.shape[1] == 0:
            return tmask
        if self.rater_rule == "released":
            logits = sig.hidden.float() @ sig.text_hidden.float().transpose(1, 2)  # (S, n, T)
        else:
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

    def rank_counts(self, sig: SegmentSignals) -> torch.Tensor:
        """(S,) long: the first release's count per segment, min(int(rank * scale + bias),
        count - 1) (count when the raters' attention matrix has full column rank), capped by the
        budget, at least 1. The rank is taken on each segment's exact raters x candidates matrix
        (padding would change the default tolerance), one segment at a time."""
        r = self.raters(sig)
        att = sig.attn_text.float().mean(dim=1)  # (S, T, n)
        out = []
        for s in range(sig.mask.shape[0]):
            c, b = int(sig.mask[s].sum()), int(sig.budget[s])
            if c == 0:
                out.append(0)
                continue
            R = att[s][r[s]][:, sig.mask[s]]
            rank = int(torch.linalg.matrix_rank(R)) if R.numel() else 0
            k = c if rank == c else min(int(rank * self.rank_scale + self.rank_bias), c - 1)
            out.append(max(1, min(k, b)))
        counts = torch.tensor(out, dtype=torch.long, device=sig.mask.device)
        sig.diagnostics["rank_count"] = counts.clone()
        return counts

    def select(self, sig: SegmentSignals) -> Selection:
        scores = self.score(sig)
        budget = self.rank_counts(sig) if self.rank_count else sig.budget
        if not self.recycle:
            return topk_selection(scores, sig.mask, budget)
        S, n = sig.mask.shape
        keep = torch.zeros_like(sig.mask)
        merge_into = torch.full((S, n), -1, dtype=torch.long, device=sig.mask.device)
        ms = masked_scores(scores, sig.mask)
        recycled = torch.zeros(S, dtype=torch.long, device=sig.mask.device)
        for s in range(S):
            count, k = int(sig.mask[s].sum()), int(budget[s])
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
#: each of its three pruning layers, for the nominal budgets 192 / 128 / 96 / 64 (the nominal budget
#: is the layer-averaged count, e.g. (2*576 + 4*300 + 10*200 + 16*110) / 32 = 191); the
#: ``sparse_token_dict`` of Gumpest/SparseVLMs@26a5f48 ``score.py`` (v1.0), 96 included.
SPARSEVLM_TABLES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
SPARSEVLM_REFERENCE_TOKENS = 576


def sparsevlm_budgets(keep, budget: str = "equivalent") -> tuple:
    """Per-stage budgets of the SparseVLM preset for ``keep``.

    ``budget="equivalent"`` (default, the paper's convention): ``keep`` is the nominal,
    layer-averaged budget; the table of the nearest nominal budget (192 / 128 / 96 / 64, as a
    fraction of 576 for float budgets) is scaled by keep / nominal. So keep=64 gives the paper's
    (66, 30, 17), keep=96 the code's (238, 48, 26) and keep=112 gives (265, 96, 32) (ties go to
    the larger table).
    ``budget="final"``: the table is scaled so that the LAST stage keeps exactly ``keep``.
    (The preset's ``budget="rank"`` uses no table: see :func:`sparsevlm_plan`.)
    """
    return scaled_table_budgets(keep, SPARSEVLM_TABLES, SPARSEVLM_REFERENCE_TOKENS, budget, "sparsevlm")


@register_method(name="sparsevlm", family="attention", paper="Zhang et al., ICML 2025 (arXiv:2410.04417)",
                 released_code="Gumpest/SparseVLMs@26a5f48 (rank counts: @b72c5d6)",
                 stages="layers 2, 6, 15", needs_attention=True, text_guided=True,
                 options=("layers", "recycle", "budget", "mode", "recycle_ratio", "cluster_ratio", "raters",
                          "rank_scale", "rank_bias") + MODIFIERS)
def sparsevlm_plan(keep, layers=(2, 6, 15), recycle: bool = False, budget: str = "equivalent", mode=None,
                   recycle_ratio: float = 0.3, cluster_ratio: float = 0.1, raters: str = "normalized",
                   rank_scale: float = 13.5, rank_bias: float = 0.0, **modifiers):
    """SparseVLM preset: stages at ``layers`` (the paper's pruning layers 2, 6, 15) with the
    budgets of :func:`sparsevlm_budgets`; ``recycle=True`` runs the stages in merge mode.

    The official code scores with the attention OF layer l and drops tokens from its output
    (entering l+1); vtoken's stage at layer L scores with layer L-1's attention and prunes the
    input of layer L, so ``layers=(3, 7, 16)`` reproduces the code's placement exactly, while
    the default keeps the paper's numbers.

    ``budget="rank"``: the first release's rank-adaptive counts (``SparseVLMScorer(rank_count=
    True)``, with ``rank_scale`` / ``rank_bias``) at every stage; ``keep`` is then a cap
    (``keep=1.0`` for the released behaviour).
    """
    layers = layer_indices(layers, "sparsevlm layers")
    rank = budget == "rank"
    budgets = (validate_budget(keep),) * len(layers) if rank else sparsevlm_budgets(keep, budget)
    if len(layers) != len(budgets):
        raise PruningConfigError(f"sparsevlm has {len(budgets)} stages; got layers={layers}")
    mode = mode or ("merge" if recycle else "select")
    scorer = SparseVLMScorer(recycle=recycle, recycle_ratio=recycle_ratio, cluster_ratio=cluster_ratio, raters=raters,
                             rank_count=rank, rank_scale=rank_scale, rank_bias=rank_bias, **modifiers)
    return [Stage(layer=L, scorer=scorer, keep=b, mode=mode) for L, b in zip(layers, budgets)]


__all__ = ["SparseVLMScorer", "sparsevlm_plan", "sparsevlm_budgets", "SPARSEVLM_TABLES", "SPARSEVLM_REFERENCE_TOKENS"]
