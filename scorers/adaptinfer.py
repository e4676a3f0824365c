"""AdaptInfer: visual tokens ranked by text->vision attention weighted by soft priors over the text
tokens taken from the same layer's text->text attention; pruned progressively with the released
budget table; followed by its method preset.
"""

from __future__ import annotations

import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import layer_indices, register_method, register_scorer
from vtoken.plan import Stage, check_budget_count, scaled_table_budgets, validate_budget
from vtoken.scorers.base import Scorer, Selection, topk_selection
from vtoken.signals import SegmentSignals


@register_scorer
class AdaptInferScorer(Scorer):
    """AdaptInfer (Zhang, Zhu, Li, Tao, Liu, Liu, "AdaptInfer: Adaptive Token Pruning for
    Vision-Language Model Inference with Dynamical Text Guidance", arXiv:2508.06084, 2025).
    Released code: weiczh02/AdaptInfer-base@9dac67c (``llava/model/language_model/score.py``,
    ``attn_postprocess_topk_with_t2t_weighting``; Qwen2-VL: ``qwen2_vl/SparseQwen/score.py``).

    Rule, per segment and per head h, with A_h the text->text block of the attention at layer
    L-1 (rows and columns: the prior's text tokens R, softmax over ALL keys, not renormalised)
    and B_h the text->vision block (rows R, columns the candidates):

    * the text-to-text map is symmetrised, W_h = A_h + A_h^T - diag(A_h), so a text token's
      prior counts the attention it receives from and pays to the other text tokens, once for
      itself: w_h[j] = sum_{i in R} W_h[i, j] = sum_i A_h[i, j] + sum_i A_h[j, i] - A_h[j, j];
    * the score of candidate v is sum_h sum_{j in R} w_h[j] B_h[j, v] (priors kept per head, heads
      summed; no normalisation, which would not change the ranking);
    * the ``budget`` highest scores are kept.

    ``rows="after"`` (default, as the released code): R = the text tokens after the segment's
    visual tokens (the code's ``text_token_start:``; signal ``text_after``); a segment with no
    such token falls back to all its text tokens. ``rows="all"``: every text token of the sample.

    Deviations:
    * The paper's own equations could not be read here (only its abstract was reachable); the
      rule above is the released code's, whose ``lb`` mixing weight (uniform prior mixed in) is
      fixed at its default 1 (no mixing) and not exposed.
    * The released code scores with the attention OF layer l and prunes its output; vtoken's stage
      at layer L scores with layer L-1's attention and prunes the input of layer L, so the preset's
      layers (2, 11, 21) are the code's ``pruning_loc`` (1, 10, 20) plus one: the same placement.
    * The code keeps ``min(k, count - 1)`` tokens (at least one dropped) and may keep none (its 32
      table ends with 0); vtoken keeps exactly ``min(budget, count)``, at least 1.
    * Multi-image samples: each image is a segment scored on its own (the code handles one image).
    * Only the LLaVA-1.5-7B table is a preset: the code's 13B table and its Qwen2-VL schedule
      (``pruning_loc`` 0, 9, 19 with keep ratios of the current count) are not; pass ``layers`` and
      a plan of :class:`vtoken.Stage` for them.

    Signals: ``attn_text_text`` (S, H, T, T), ``attn_text`` (S, H, T, n), ``text_after`` (S, T).
    """

    name = "adaptinfer"
    needs = frozenset({"attn_text_text", "attn_text", "text_after"})
    text_guided = True

    def __init__(self, rows: str = "after"):
        if rows not in ("after", "all"):
            raise PruningConfigError(f"adaptinfer rows must be 'after' or 'all'; got {rows!r}")
        self.rows = rows

    def prior_rows(self, sig: SegmentSignals) -> torch.Tensor:
        """(S, T) bool: the text tokens R the priors and scores are taken over."""
        tmask = sig.text_mask.to(sig.mask.device)
        if self.rows == "all" or sig.text_after is None:
            return tmask
        after = tmask & sig.text_after.to(tmask.device)
        return torch.where(after.any(dim=1, keepdim=True), after, tmask)

    def priors(self, sig: SegmentSignals) -> torch.Tensor:
        """(S, H, T) the per-head text priors w_h[j] (zero outside R)."""
        r = self.prior_rows(sig).float()
        a = sig.attn_text_text.float() * r[:, None, :, None] * r[:, None, None, :]  # (S, H, T, T)
        received = a.sum(dim=2)
        paid = a.sum(dim=3)
        own = a.diagonal(dim1=2, dim2=3)
        return (received + paid - own) * r[:, None, :]

    def score(self, sig: SegmentSignals) -> torch.Tensor:
        return torch.einsum("sht,shtn->sn", self.priors(sig), sig.attn_text.float())

    def select(self, sig: SegmentSignals) -> Selection:
        return topk_selection(self.score(sig), sig.mask, sig.budget)


#: AdaptInfer's released budget table for LLaVA-1.5-7B (576 visual tokens): tokens kept after
#: each of its three pruning layers for the nominal budgets 128 / 64 / 48 / 32
#: (``sparse_token_dict`` of weiczh02/AdaptInfer-base@9dac67c ``score.py``, "ours 7b").
ADAPTINFER_TABLES = {128: (290, 72, 18), 64: (133, 27, 3), 48: (80, 24, 2), 32: (40, 12, 0)}
ADAPTINFER_REFERENCE_TOKENS = 576


def adaptinfer_budgets(keep, budget: str = "equivalent") -> tuple:
    """Per-stage budgets of the AdaptInfer preset for ``keep``.

    ``budget="equivalent"`` (default, the released code's convention): ``keep`` is the nominal
    budget; the table of the nominal budget nearest ``keep`` (a float is a fraction of 576; ties
    go to the larger table) is scaled by keep / nominal. keep=64 gives (133, 27, 3).
    ``budget="final"``: the table whose last stage is nearest ``keep`` (tables ending at 0
    excluded) is scaled so that the LAST stage keeps exactly ``keep`` (``vtoken eval``'s "Retain
    N" blocks count final tokens; SparseVLM's preset has the same option).
    Each stage keeps at least 1 token (fraction 1e-6) and never more than the stage before;
    keep=1.0 keeps every token at every stage (no pruning).
    """
    keep = validate_budget(keep)
    check_budget_count(budget, "adaptinfer")
    if isinstance(keep, float) and keep == 1.0:  # keep everything at every stage
        return (1.0,) * len(next(iter(ADAPTINFER_TABLES.values())))
    return scaled_table_budgets(keep, ADAPTINFER_TABLES, ADAPTINFER_REFERENCE_TOKENS, budget, "adaptinfer")


@register_method(name="adaptinfer", family="attention", paper="Zhang et al. 2025 (arXiv:2508.06084)",
                 released_code="weiczh02/AdaptInfer-base@9dac67c", stages="layers 2, 11, 21",
                 needs_attention=True, text_guided=True, options=("layers", "rows", "budget", "mode"))
def adaptinfer_plan(keep, layers=(2, 11, 21), rows: str = "after", budget: str = "equivalent", mode: str = "select"):
    """AdaptInfer preset: stages at ``layers`` (the released ``pruning_loc`` 1, 10, 20 plus one, see
    :class:`AdaptInferScorer`) with the budgets of :func:`adaptinfer_budgets` (``budget``:
    ``"equivalent"``, the released table's nominal count, or ``"final"``, the last stage keeps
    ``keep``)."""
    layers = layer_indices(layers, "adaptinfer layers")
    budgets = adaptinfer_budgets(keep, budget)
    if len(layers) != len(budgets):
        raise PruningConfigError(f"adaptinfer has {len(budgets)} stages; got layers={layers}")
    scorer = AdaptInferScorer(rows=rows)
    return [Stage(layer=L, scorer=scorer, keep=b, mode=mode) for L, b in zip(layers, budgets)]


__all__ = ["AdaptInferScorer", "adaptinfer_plan", "adaptinfer_budgets", "ADAPTINFER_TABLES",
           "ADAPTINFER_REFERENCE_TOKENS"]
