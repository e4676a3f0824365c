"""What a scorer sees: the signals of one pruning stage, gathered per visual *segment*.

A segment is one image (or one video) of one sample. At a stage, the runtime collects every
segment of the batch that still has prunable visual tokens, pads them to a common candidate
count ``n`` and hands the scorer one :class:`SegmentSignals`. Scorers are pure functions of
these tensors: no model access, no global state.

Shapes (S = segments in the batch, n = max candidates per segment, H = attention heads,
T = max text rows per segment's sample, D = hidden size, Dk = key size = kv_heads * head_dim):

=====================  ======================  ==============================================
field                  shape                   meaning
=====================  ======================  ==============================================
mask                   (S, n) bool             real candidate slots (False = padding slot)
budget                 (S,) long               tokens to keep per segment (<= candidates)
index                  (S, n) long             index of each candidate among its segment's
                                               ORIGINAL visual tokens (0..n_orig-1); -1 pad
grid                   list of (t, h, w)       the segment's original token grid, or None
sample                 (S,) long               which batch row each segment belongs to
ordinal                (S,) long               the segment's number within its sample (0, 1..)
original               (S,) long               the segment's original visual-token count
hidden                 (S, n, D)               hidden states entering the stage's layer
text_hidden            (S, T, D)               hidden states of the sample's text tokens
text_mask              (S, T) bool             real text rows
text_after             (S, T) bool             text rows after the segment's visual tokens in
                                               the sequence (the prompt following the image)
normed_hidden          (S, n, D)               ``hidden`` passed through the LLM's final norm
                                               (the adapter's ``final_norm``)
normed_text_hidden     (S, T, D)               ``text_hidden`` through the same final norm
attn_last              (S, H, n)               softmax attention probability from the sample's
                                               last prompt token to each candidate, at the
                                               layer before the stage (layer L-1), per head
attn_last_text         (S, H, T)               same query row, attention to the text tokens
attn_text              (S, H, T, n)            attention probability of every text row
                                               (query) to each candidate at layer L-1
keys                   (S, n, Dk)              post-RoPE key states of the candidates, L-1
text_keys              (S, T, Dk)              post-RoPE key states of the text tokens, L-1
vision_attn            (S, n)                  vision-encoder attention each candidate
                                               receives: from [CLS] where the tower has one,
                                               else mean attention received (pooled to LLM
                                               tokens where patches are merged)
vision_keys            (S, n, Dv)              vision-encoder key states (same layer)
layer_attn_last        (S, Lyr, H, n)          ``attn_last`` at every layer 0..L-1 (for
                                               information-flow scorers)
generator              torch.Generator         seeded generator (random baselines)
=====================  ======================  ==============================================

A field the stage's scorer did not declare in ``needs`` is ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

#: Every signal name a scorer may declare in ``needs``.
SIGNAL_NAMES = frozenset(
    {
        "hidden",
        "text_hidden",
        "text_after",
        "normed_hidden",
        "normed_text_hidden",
        "attn_last",
        "attn_last_text",
        "attn_text",
        "keys",
        "text_keys",
        "vision_attn",
        "vision_keys",
        "layer_attn_last",
    }
)


@dataclass
class SegmentSignals:
    """Padded per-segment signals of one stage; see the module docstring for shapes."""

    mask: torch.Tensor
    budget: torch.Tensor
    index: torch.Tensor
    sample: torch.Tensor
    ordinal: torch.Tensor
    original: torch.Tensor
    grid: Optional[list] = None
    hidden: Optional[torch.Tensor] = None
    text_hidden: Optional[torch.Tensor] = None
    text_mask: Optional[torch.Tensor] = None
    text_after: Optional[torch.Tensor] = None
    normed_hidden: Optional[torch.Tensor] = None
    normed_text_hidden: Optional[torch.Tensor] = None
    attn_last: Optional[torch.Tensor] = None
    attn_last_text: Optional[torch.Tensor] = None
    attn_text: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    text_keys: Optional[torch.Tensor] = None
    vision_attn: Optional[torch.Tensor] = None
    vision_keys: Optional[torch.Tensor] = None
    layer_attn_last: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None
    #: Free-form diagnostics a scorer may fill (e.g. ``{"erank": tensor(S,)}``); copied to stats.
    diagnostics: dict = field(default_factory=dict)

    @property
    def num_segments(self) -> int:
        return int(self.mask.shape[0])

    @property
    def counts(self) -> torch.Tensor:
        """(S,) number of real candidates per segment."""
        return self.mask.sum(dim=1)
