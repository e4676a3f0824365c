"""Pure tensor functions the scorers are built from (no scorer state, no model access): the one
import surface of the scorers' maths (``from vtoken.scorers import functional as F``).

Every function works on padded per-segment tensors: ``mask`` (S, n) bool marks the real
candidate slots of each segment; padding slots never influence a result and are never chosen.

The functions live by family and are re-exported here:

* :mod:`~vtoken.scorers.functional_attention` -- attention distributions: head mean,
  normalisation, entropy, cumulative share (ZipVL), rollout over layers, the residual-mixed
  attention graph.
* :mod:`~vtoken.scorers.functional_flow` -- attention flow: maximum flow through the layered
  attention graph.
* :mod:`~vtoken.scorers.functional_diversity` -- feature geometry and diversity: cosine
  similarity, nearest neighbours, greedy max-min selection, effective rank, DPC-kNN clustering.
* :mod:`~vtoken.scorers.functional_debias` -- Attention Debiasing: positional trend, empty tokens.
* :mod:`~vtoken.scorers.functional_sinks` -- visual sinks: massive-activation dimensions and tokens
  (VAR), attention received (ACT), alignment with the primary sink (secondary sinks).
"""

from __future__ import annotations

from vtoken.scorers.functional_attention import (
    attention_entropy,
    attention_rollout,
    cumulative_share_count,
    head_mean,
    normalize_attention,
    residual_attention,
)
from vtoken.scorers.functional_debias import empty_tokens, positional_trend, remove_positional_trend
from vtoken.scorers.functional_diversity import (
    cosine_to,
    dpc_knn,
    erank,
    erank_per_segment,
    deferred_erank,
    greedy_maxmin,
    masked_max_similarity,
    nearest_neighbour_distance,
    unit_rows,
)
from vtoken.scorers.functional_flow import attention_flow, max_flow
from vtoken.scorers.functional_sinks import (
    SINK_RULES,
    act_sinks,
    massive_activation_tokens,
    primary_sink,
    rms_normalize,
    secondary_sinks,
    sink_dimensions,
    visual_sinks,
)

__all__ = [
    "head_mean",
    "normalize_attention",
    "attention_entropy",
    "cumulative_share_count",
    "unit_rows",
    "nearest_neighbour_distance",
    "greedy_maxmin",
    "masked_max_similarity",
    "cosine_to",
    "erank",
    "erank_per_segment",
    "deferred_erank",
    "attention_rollout",
    "residual_attention",
    "attention_flow",
    "max_flow",
    "positional_trend",
    "remove_positional_trend",
    "empty_tokens",
    "rms_normalize",
    "sink_dimensions",
    "massive_activation_tokens",
    "visual_sinks",
    "act_sinks",
    "primary_sink",
    "secondary_sinks",
    "SINK_RULES",
    "dpc_knn",
]
