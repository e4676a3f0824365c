"""What one pruned call carries: the per-call context, the generate session, and the records a
pruned prefill leaves for its decode steps (on the KV cache) and for stats.

Pure data; the runtime (:mod:`vtoken.hooks.runtime`) creates and fills these, the stage
(:mod:`vtoken.hooks.stage`), signal (:mod:`vtoken.hooks.stage_signals`) and probe
(:mod:`vtoken.hooks.captures`) modules read and update a :class:`CallContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch


@dataclass
class StageState:
    """The layout after one stage: original position of every slot (-1 = padding slot)."""

    layer: int
    positions: torch.Tensor  # (B, Ns) long
    valid: torch.Tensor  # (B, Ns) bool
    all_valid: bool = False  # every slot valid (decided once, so decode steps need no sync)
    #: the stage dropped nothing and the layout is still the original one: a no-cache replay
    #: keeps the model's own layout and masks there too (keep-all == the unpatched model, padding
    #: rows' hidden states included)
    identity: bool = False
    #: a merging stage's assignment, re-applied by a no-cache replay (whose hidden states of the
    #: prompt are the prefill's: causal attention)
    merge: Optional["MergeRecord"] = None


class MergeRecord(NamedTuple):
    """Which candidate a merging stage averaged into which, in the slots of the layout it saw:
    ``sample`` (S,), ``slot_pad`` (S, n) slot of each candidate (-1 padding), ``mask`` (S, n)
    real candidates, ``keep`` (S, n) kept ones, ``target`` (S, n) the candidate (index in the
    segment's row) each one is averaged into (itself when kept or padding)."""

    sample: torch.Tensor
    slot_pad: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor
    target: torch.Tensor


class StageOps(NamedTuple):
    """What a stage did to the hidden states entering its layer, to redo it on the same input
    (gradient checkpointing's recomputation): ``merge`` (a MergeRecord or None), then ``take``
    (B, Nn) slots gathered into the new layout (None: the layout was kept)."""

    merge: Optional[MergeRecord]
    take: Optional[torch.Tensor]


@dataclass
class PruneState:
    """What decode steps need to know about a pruned prefill; stored on the KV cache."""

    n_prefill: int
    stages: list
    extra: int = 0  # tokens appended after the prefill so far


@dataclass
class StageTrace:
    """Raw record of one stage for stats (converted lazily)."""

    layer: int
    scorer: str
    mode: str
    positions: torch.Tensor  # (B, Ns) original positions after the stage
    seg_sample: torch.Tensor
    seg_index: torch.Tensor  # (S, n) original index within segment of each candidate (-1 pad)
    seg_keep: torch.Tensor  # (S, n) bool
    seg_scores: Optional[torch.Tensor]  # (S, n)
    diagnostics: dict


class PrefillMeta(NamedTuple):
    """What stats need of the last pruned prefill (read after the forward, on request)."""

    layout: object
    prepared: object  # PreparedPrefill: vis_ordinal is uploaded when first read
    orig_valid: Optional[torch.Tensor]


@dataclass
class CallContext:
    """One forward of the multimodal model (thread-local on the runtime): its visual layout and
    host plan, the mode (``off``, ``prefill``, ``replay``, ``decode``), the current layout of the
    sequence (``cur_pos`` original position per slot, -1 padding; ``cur_valid``), the kwargs the
    layers of the current span receive, and the attention captures of the probes."""

    layout: object = None
    inputs: Optional[dict] = None
    vision: list = field(default_factory=list)  # [(attn (P,), keys (P, Dk))] per image, in order
    feature_lengths: dict = field(default_factory=dict)
    mode: str = "off"
    orig_valid: Optional[torch.Tensor] = None
    n: int = 0
    cur_pos: Optional[torch.Tensor] = None
    cur_valid: Optional[torch.Tensor] = None
    pos_emb0: object = None
    pos_ids0: Optional[torch.Tensor] = None
    span: dict = field(default_factory=dict)  # kwargs substituted in layers of the current span
    span_masks: list = field(default_factory=list)  # decode: mask per stage
    attn: dict = field(default_factory=dict)  # layer -> {"last": (B,H,1,N), "text": ..., "keys": ...}
    state: Optional[PruneState] = None
    replay: Optional[PruneState] = None
    trace: list = field(default_factory=list)
    ids_host: Optional[torch.Tensor] = None  # host copies of a prefill's input_ids / 2-D mask
    mask_host: Optional[torch.Tensor] = None
    prepared: object = None  # PreparedPrefill (vtoken.hooks.prefill_plan)
    relaid: bool = False  # a stage has re-laid-out the sequence (slots no longer original positions)
    checks: Optional[list] = None  # budget checks deferred to the end of the multimodal forward
    stage_ops: Optional[StageOps] = None  # what the last stage did (see StageOps)
    visual_call: bool = False  # the forward carries visual inputs (pixels, or features encoded by generate)
    fixed: object = None  # a fixed-slot KV cache (StaticCache) this prefill prunes into
    fixed_len: int = 0  # its slots per layer before pruning (prompt + tokens to come)
    in_flight: bool = False  # counted in the runtime's prefills_in_flight until on_multimodal_done
    #: what a layout gave (see :func:`on_layout`): name -> (cur_pos, cur_valid, value)
    layout_memo: dict = field(default_factory=dict)


def on_layout(ctx: CallContext, name, build):
    """``build()`` once per layout of this forward: a stage that drops nothing leaves ``cur_pos`` /
    ``cur_valid`` as they are (the same tensors), and the next stage reuses what they gave (its
    candidates, the text rows) instead of recomputing them with their host syncs."""
    hit = ctx.layout_memo.get(name)
    if hit is not None and hit[0] is ctx.cur_pos and hit[1] is ctx.cur_valid:
        return hit[2]
    value = build()
    ctx.layout_memo[name] = (ctx.cur_pos, ctx.cur_valid, value)
    return value


class GenerateSession:
    """One ``generate`` call: holds the prompt's decisions for no-cache generation, and the shape of
    the ``input_ids`` the call was given (``generate`` may repeat every row for beams / return
    sequences, and append an assistant's candidates to the prompt's forward)."""

    def __init__(self, batch: Optional[int] = None, prompt_len: Optional[int] = None):
        self.state: Optional[PruneState] = None
        self.batch = batch
        self.prompt_len = prompt_len  # a longer prefill carries appended candidates (assisted decoding)
        #: the adapter's layout inputs ``generate`` was given (e.g. Qwen's ``image_grid_thw``), for the
        #: forwards that get pre-encoded features without them (transformers >= 5.2x)
        self.layout_inputs: dict = {}
