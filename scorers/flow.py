"""Information-flow scorers: FlowCut, attention rollout and attention flow, each followed by its
method preset (registered with :func:`vtoken.methods.register_method`)."""

from __future__ import annotations

import torch

from vtoken.errors import PruningConfigError
from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.attention_base import MODIFIERS, AttentionScorer
from vtoken.signals import SegmentSignals


def rollout_row(attn_layers: torch.Tensor, query: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Row ``query`` of :func:`functional.attention_rollout`, without forming the (m x m) product.

    attn_layers (S, Lyr, m, m), query (S,) long -> (S, m): r = e_q^T A'_{Lyr-1} ... A'_0, computed
    from the top layer down (O(Lyr m^2) instead of O(Lyr m^3)).
    """
    a = attn_layers.float()
    S, Lyr, m, _ = a.shape
    r = torch.zeros(S, m, dtype=torch.float32, device=a.device)
    r[torch.arange(S, device=a.device), query.to(a.device)] = 1.0
    for layer in range(Lyr - 1, -1, -1):
        al = a[:, layer]
        rows = (residual + (1.0 - residual) * al.sum(dim=-1)).clamp(min=1e-30)  # row sums of A'
        # r @ A' with A' = (residual I + (1 - residual) A) / rowsum
        w = r / rows
        r = residual * w + (1.0 - residual) * (w.unsqueeze(1) @ al).squeeze(1)
    return r


@register_scorer
class FlowCutScorer(AttentionScorer):
    """FlowCut (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient
    Vision-Language Models", arXiv:2505.19536).

    The paper's observations: redundancy emerges progressively across layers; a single layer's
    attention can contradict the others; the vision encoder's [CLS] token acts as a relay that
    gathers information from the patches and hands it on. FlowCut therefore ranks tokens by a
    score accumulated over layers -- cumulative = 0.5 * cumulative + 0.5 * current at every
    layer -- rather than by one layer's attention, with [CLS] attention as the per-layer signal
    inside the encoder.

    vtoken's reading, with the signals a pure scorer gets: the information flow into the
    prediction is the attention of the last prompt token to each visual token at every LLM layer
    0..K-1 (``layer_attn_last``, heads averaged, normalised per layer), accumulated with the
    paper's running average (``momentum`` = 0.5); ``relay=True`` starts the accumulation from the
    relay's (normalised) attention to each patch (``vision_attn``), the information the relay
    carried out of the encoder, so the flow runs encoder -> relay -> LLM layers:

        flow_0 = vision_attn / sum(vision_attn)             (relay; else flow_0 = c_0)
        flow_l = momentum * flow_(l-1) + (1 - momentum) * c_l,   c_l = normalised head-mean
                                                                   attention of layer l

    The relay is the [CLS] token where the vision tower has one (LLaVA's CLIP: [CLS] attention at
    the feature layer, as FlowCut's released CLIP code reads it); on encoders without [CLS]
    (Qwen2-VL) it is the adapter's stand-in, the mean attention each patch receives (the
    authors' Qwen2-VL port uses the attention of the mean query for the same role).

    Fidelity: the accumulation (the first scored layer's score, then cumulative = 0.5 *
    cumulative + 0.5 * score) is the released one and tests/test_fidelity_flow.py holds the kept
    sets to it; the per-layer score is not. Deviations (the released score needs signals a
    scorer does not get): the released rule (TungChintao/FlowCut@a2ecd24, ``flowcut/modeling_clip_flowcut.py``
    and ``utils_flowcut.py``) runs inside the CLIP encoder, at every layer before the feature
    layer: score = (a_cls / sum a_cls + s / sum s) * ||v||_1, with a_cls the head-mean [CLS]
    attention row, s the head-mean softmax of the [CLS] value against every value, v the
    head-mean value vector; cumulative = 0.5 * cumulative + 0.5 * score; every second layer it
    keeps the top max(N - r, target) tokens by cumulative score, r = round((N - target) /
    sqrt(layers left) * (1 - H^2)) with H the normalised entropy of a_cls. That needs
    per-encoder-layer [CLS] attention, values and in-encoder pruning (no scorer signal carries
    them); vtoken scores once at the stage (default layer 2 of the LLM) with a fixed budget.
    (Its LLaVA-NeXT path also prunes once inside the LLM, at layer 1, by the same score with the
    last instruction token's query and value in place of [CLS]: that needs value states too.)

    Signals: ``layer_attn_last`` (S, Lyr, H, n); with ``relay`` also ``vision_attn`` (S, n) as an
    *optional* signal (``optional_needs``): the runtime captures and fills it where the adapter
    maps vision-encoder attention to LLM tokens (``Adapter.vision_attention_module``; LLaVA-1.5,
    Qwen2-VL images), and leaves it None elsewhere (the flow then starts at LLM layer 0) or NaN
    on the rows of segments it has no capture for (video), which then run without the relay.
    ``relay="require"`` makes it a hard need (an error where the model cannot provide it).
    Diagnostics: ``relay`` (S,) bool, whether the relay was used for each segment.
    """

    name = "flowcut"
    needs = frozenset({"layer_attn_last"})

    def __init__(self, relay=True, momentum: float = 0.5, **modifiers):
        super().__init__(**modifiers)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1); got {momentum}")
        if relay not in (True, False, "require"):
            raise ValueError(f"relay must be True, False or 'require'; got {relay!r}")
        self.relay = relay
        self.momentum = float(momentum)
        self.optional_needs = frozenset({"vision_attn"}) if relay is True else frozenset()
        if relay == "require":
            self.needs = frozenset(self.needs | {"vision_attn"})

    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:
        dev = sig.mask.device
        va = sig.vision_attn if self.relay else None
        if va is None:
            relay = torch.zeros(sig.num_segments, dtype=torch.bool, device=dev)
        else:  # per segment: a NaN row is a segment the runtime has no relay for
            va = va.to(dev)
            relay = torch.isfinite(va).all(dim=1)
            va = F.normalize_attention(va.nan_to_num(0.0), sig.mask)
        sig.diagnostics["relay"] = relay
        layers = sig.layer_attn_last
        if layers is None or layers.shape[1] == 0:
            if va is None or not bool(relay.all()):
                raise ValueError("flowcut needs layer_attn_last (a stage at layer >= 1) or vision_attn")
            return va
        m = self.momentum
        flow = None
        for layer in range(layers.shape[1]):
            cur = F.normalize_attention(F.head_mean(layers[:, layer]), sig.mask)
            if flow is None:  # the relay rows start from the relay, the others at layer 0
                flow = cur if va is None else torch.where(relay.unsqueeze(1), m * va + (1.0 - m) * cur, cur)
            else:
                flow = m * flow + (1.0 - m) * cur
        return flow


@register_method(name="flowcut", family="flow", paper="Tong et al. 2025 (arXiv:2505.19536)",
                 released_code="TungChintao/FlowCut@a2ecd24 (accumulation only; per-layer score deviates)",
                 stages="layer K=2", needs_attention=True, text_guided=True,
                 options=("K", "relay", "momentum", "mode") + MODIFIERS)
def flowcut_plan(keep, K: int = 2, relay=True, momentum: float = 0.5, mode: str = "select", **modifiers):
    """FlowCut preset: one stage at layer ``K`` ranked by the flow accumulated over layers
    0..K-1 (started from the vision-encoder relay where the model provides it)."""
    scorer = FlowCutScorer(relay=relay, momentum=momentum, **modifiers)
    return [Stage(layer=K, scorer=scorer, keep=validate_budget(keep), mode=mode)]


def _full_attention(sig: SegmentSignals, method: str) -> tuple:
    """(layer_attn_full, full_pos, full_query) of ``sig``; ValueError naming ``method`` if absent."""
    attn = getattr(sig, "layer_attn_full", None)
    pos = getattr(sig, "full_pos", None)
    query = getattr(sig, "full_query", None)
    if attn is None or pos is None or query is None:
        raise ValueError(f"{method} needs the signals layer_attn_full, full_pos and full_query")
    return attn, pos, query


@register_scorer
class RolloutScorer(AttentionScorer):
    """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers",
    ACL 2020, arXiv:2005.00928) as a token-importance scorer.

    The attention of every layer 0..K-1 is averaged over heads, mixed with the residual stream
    (A' = 0.5 A + 0.5 I, rows renormalised) and multiplied through the layers; a visual token's
    score is its entry in the last prompt token's row of the rollout, i.e. how much of that
    token's input reaches the prediction through all attention paths, not only the direct one.
    The default (``residual`` = 0.5) is the authors' released ``compute_joint_attention``
    (samiraabnar/attention_flow@8044f53, ``attention_graph_util.py``, ``add_residual=True``:
    (A + I) / row sum, later layers multiplied from the left); ``residual=0`` is its
    ``add_residual=False``. tests/test_fidelity_flow.py holds the kept sets to it.

    Signals (full attention, not in the base signal set; the runtime provides them where it can):
    ``layer_attn_full`` (S, Lyr, m, m) head-averaged attention at layers 0..K-1 among the m
    tokens of the segment's sample (sequence order, padding rows/columns zero), ``full_pos``
    (S, n) long column of each candidate in that sequence (-1 on padding slots), ``full_query``
    (S,) long row of the sample's last prompt token.
    """

    name = "rollout"
    needs = frozenset({"layer_attn_full", "full_pos", "full_query"})

    def __init__(self, residual: float = 0.5, **modifiers):
        super().__init__(**modifiers)
        if not 0.0 <= residual <= 1.0:
            raise ValueError(f"residual must lie in [0, 1]; got {residual}")
        self.residual = float(residual)

    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:
        attn, pos, query = _full_attention(sig, "rollout")
        row = rollout_row(attn, query, self.residual)  # (S, m)
        got = row.gather(1, pos.clamp(min=0).to(row.device))
        return got.masked_fill(~sig.mask, 0.0)


@register_method(name="rollout", family="flow", paper="Abnar & Zuidema, ACL 2020 (arXiv:2005.00928)",
                 released_code="samiraabnar/attention_flow@8044f53",
                 stages="layer K=2", needs_attention=True, text_guided=True,
                 options=("K", "residual", "mode") + MODIFIERS)
def rollout_plan(keep, K: int = 2, residual: float = 0.5, mode: str = "select", **modifiers):
    """Attention-rollout preset: one stage at layer ``K``."""
    return [Stage(layer=K, scorer=RolloutScorer(residual=residual, **modifiers), keep=validate_budget(keep), mode=mode)]


@register_scorer
class AttentionFlowScorer(AttentionScorer):
    """Attention flow (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020,
    arXiv:2005.00928) as a token-importance scorer.

    The attention graph has a node per token at every layer boundary 0..K; the edge from token j
    at boundary l to token i at boundary l+1 has capacity A'_l[i, j], the head-averaged attention
    of layer l mixed with the residual (A' = 0.5 A + 0.5 I, rows renormalised: the paper's
    ``res_att_mat``). A visual token's score is the value of a maximum flow from it at boundary 0
    to the last prompt token at boundary K (:func:`vtoken.scorers.functional_flow.attention_flow`);
    the top-budget tokens are kept. Unlike rollout, which sums the products of the weights along
    all paths, a path carries at most its weakest edge and paths share edge capacities.

    Graph as in the authors' released code (samiraabnar/attention_flow@8044f53, ``get_adjmat`` and
    ``compute_flows``: the same nodes, edges and capacities, residual added and rows
    renormalised). Deviations: (1) the flow runs from the input token up to the query, where
    the released code asks networkx for the flow from the top-layer node down to the input
    node over edges pointing down -- the same graph with every edge reversed, hence the same
    maximum-flow value; (2) the released code divides each output node's flows by their sum over
    all input tokens; that constant per sample does not change the ranking and is left out, so
    scores are the raw flow values (in [0, 1]); (3) maximum flows are solved here (exact
    closed forms for K <= 2, Dinic's algorithm from K = 3 on) instead of by networkx's
    Edmonds-Karp; (4) only the visual candidates are scored, not every input token; (5) the
    flow's sink is the sample's last prompt token (whose next-token prediction pruning serves),
    where the paper reads the flows into the [CLS] or masked token of a BERT-style classifier.

    Cost: K = 1 or 2 (the default) is exact in closed form, O(m^2) per segment, m = the
    sample's tokens. From K = 3 on a general maximum flow is solved per visual token on
    (K - 1) m + 2 nodes and about (K - 2) m^2 / 2 edges, O(V^2 E) each in the worst case, in
    Python on the CPU: for small m and analysis (about 5 s per image at K = 3 with m = 256 on
    one CPU core). A sample with more than ``max_tokens`` (256) tokens raises
    :class:`~vtoken.errors.PruningConfigError` there instead of running for minutes;
    ``max_tokens=None`` lifts the limit.

    Signals: ``layer_attn_full`` (S, Lyr, m, m) head-averaged attention at layers 0..K-1 among
    the m tokens of the segment's sample (padding rows/columns zero), ``full_pos`` (S, n) long
    column of each candidate (-1 on padding slots), ``full_query`` (S,) long row of the sample's
    last prompt token (as for :class:`RolloutScorer`).
    """

    name = "attnflow"
    needs = frozenset({"layer_attn_full", "full_pos", "full_query"})

    def __init__(self, residual: float = 0.5, max_tokens=256, **modifiers):
        super().__init__(**modifiers)
        if not 0.0 <= residual <= 1.0:
            raise ValueError(f"residual must lie in [0, 1]; got {residual}")
        if max_tokens is not None and int(max_tokens) < 1:
            raise PruningConfigError(f"attnflow max_tokens must be >= 1 or None; got {max_tokens}")
        self.residual = float(residual)
        self.max_tokens = None if max_tokens is None else int(max_tokens)

    def raw_scores(self, sig: SegmentSignals) -> torch.Tensor:
        attn, pos, query = _full_attention(sig, "attnflow")
        if attn.shape[1] >= 3 and self.max_tokens is not None:
            tokens = int((attn.sum(dim=-1).amax(dim=1) > 0).sum(dim=1).max()) if attn.numel() else 0
            if tokens > self.max_tokens:
                raise PruningConfigError(
                    f"attnflow at K={attn.shape[1]} solves one maximum flow per visual token through "
                    f"{attn.shape[1]} attention layers of a {tokens}-token sample, more than max_tokens="
                    f"{self.max_tokens}; use K <= 2 (exact in closed form), method='rollout', or pass "
                    f"max_tokens=None to run it anyway")
        flow = F.attention_flow(attn, query, torch.where(sig.mask, pos, torch.full_like(pos, -1)), self.residual)
        return flow.to(sig.mask.device).masked_fill(~sig.mask, 0.0)


@register_method(name="attnflow", family="flow", paper="Abnar & Zuidema, ACL 2020 (arXiv:2005.00928)",
                 released_code="samiraabnar/attention_flow@8044f53",
                 stages="layer K=2", needs_attention=True, text_guided=True,
                 options=("K", "residual", "max_tokens", "mode") + MODIFIERS)
def attnflow_plan(keep, K: int = 2, residual: float = 0.5, max_tokens=256, mode: str = "select", **modifiers):
    """Attention-flow preset: one stage at layer ``K`` (>= 1: the flow runs through the attention of
    layers 0..K-1), ranked by the maximum flow from each visual token into the last prompt token."""
    if int(K) < 1:
        raise PruningConfigError(f"attnflow needs K >= 1 (attention of layers 0..K-1); got K={K}")
    scorer = AttentionFlowScorer(residual=residual, max_tokens=max_tokens, **modifiers)
    return [Stage(layer=K, scorer=scorer, keep=validate_budget(keep), mode=mode)]


__all__ = ["FlowCutScorer", "RolloutScorer", "AttentionFlowScorer", "rollout_row", "flowcut_plan", "rollout_plan",
           "attnflow_plan"]
