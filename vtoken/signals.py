"""What a scorer sees: the signals of one pruning stage, gathered per visual *segment*.

A segment is one image (or one video) of one sample. At a stage, the runtime collects every
segment of the batch that still has prunable visual tokens, pads them to a common candidate
count ``n`` and hands the scorer one :class:`SegmentSignals`. Scorers are pure functions of
these tensors: no model access, no global state.

This module is the one declaration of the signal contract: :data:`SIGNALS` names every signal
a scorer may declare in ``needs`` (shape, meaning, and which attention captures it takes);
the runtime collects exactly these (``vtoken.hooks.stage_signals``), installs the attention
probes they ask for (``vtoken.hooks.probe.probe_rows``), and the methods table describes them.

Shapes (S = segments in the batch, n = max candidates per segment, H = attention heads,
T = max text rows per segment's sample, D = hidden size, Dk = key size = kv_heads * head_dim,
Lyr = layers before the stage, m = tokens of the segment's sample). Always present:

=====================  ======================  ==============================================
field                  shape                   meaning
=====================  ======================  ==============================================
mask                   (S, n) bool             real candidate slots (False = padding slot)
budget                 (S,) long               tokens to keep per segment (<= candidates)
index                  (S, n) long             index of each candidate among its segment's
                                               ORIGINAL visual tokens (0..n_orig-1); -1 pad
grid                   list of (t, h, w)       the segment's original token grid, or None
kind                   list of str             "image" or "video" per segment (the adapter's
                                               layout; None where unknown)
video                  list of int or None     the video a segment belongs to where a video spans
                                               several consecutive segments (Qwen3-VL's temporal
                                               groups, in frame order); None per segment else,
                                               or None
sample                 (S,) long               which batch row each segment belongs to
ordinal                (S,) long               the segment's number within its sample (0, 1..)
original               (S,) long               the segment's original visual-token count
text_mask              (S, T) bool             real text rows (with any ``text_*`` signal)
generator              torch.Generator         seeded generator (random baselines), or None
=====================  ======================  ==============================================

A declared signal the stage's scorer did not list in ``needs`` is ``None``.

:func:`attention_probs` is the one definition of an attention row (a query's softmax over keys) that
the decode-time producers of attention signals share: the dynamic runtime's probes
(``vtoken.hooks.probe``), LazyLLM's last-query score (``vtoken.scorers.decode``) and the static
engine's reference row (``vtoken.engine.static_stages``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


def attention_probs(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Per-head softmax probabilities of queries over keys, in float32.

    query (B, H, Q, D), keys (B, Hkv, K, D) post-RoPE (GQA: KV head ``h // (H // Hkv)`` serves query
    head ``h``); allowed (B, Q, K) bool, the keys each query row sees. -> (B, H, Q, K) float32; a row
    that sees no key is all zero. Callers reduce over the heads (dim 1) as their signal defines."""
    H = query.shape[1]
    k = keys.float().repeat_interleave(H // keys.shape[1], dim=1)  # (B, H, K, D)
    logits = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling  # (B, H, Q, K)
    probs = torch.softmax(logits.masked_fill(~allowed.unsqueeze(1), float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


@dataclass(frozen=True)
class Signal:
    """One declarable signal.

    ``probe``: the attention captures the runtime records for it ("last": the last prompt
    token's softmax row, "text": the text rows' softmax rows, "keys": post-RoPE keys, "full":
    every row, head-averaged), at the layer before the stage, or at every layer before it when
    ``every_layer``. ``vision``: read from the vision encoder's probe. ``causal``: see below.
    """

    name: str
    shape: str
    meaning: str
    probe: tuple = ()
    every_layer: bool = False
    vision: bool = False
    #: computed from the visual tokens themselves: tokens appended after them in a prefill (an
    #: assistant's candidates) do not change it, unlike the last token's or the text rows' signals
    causal: bool = False


#: Every signal a scorer may declare in ``needs`` (or ``optional_needs``), in one place.
SIGNALS = {s.name: s for s in (
    Signal("hidden", "(S, n, D)", "hidden states entering the stage's layer", causal=True),
    Signal("text_hidden", "(S, T, D)", "hidden states of the sample's text tokens"),
    Signal("text_after", "(S, T) bool", "text rows after the segment's visual tokens in the sequence "
                                        "(the prompt following the image)"),
    Signal("normed_hidden", "(S, n, D)", "``hidden`` through the LLM's final norm (the adapter's final_norm)",
           causal=True),
    Signal("normed_text_hidden", "(S, T, D)", "``text_hidden`` through the same final norm"),
    Signal("attn_last", "(S, H, n)", "softmax attention from the sample's last prompt token to each candidate, "
                                     "at the layer before the stage (L-1), per head", probe=("last",)),
    Signal("attn_last_text", "(S, H, T)", "the same query row, attention to the text tokens", probe=("last",)),
    Signal("attn_text", "(S, H, T, n)", "attention of every text row (query) to each candidate at L-1",
           probe=("text",)),
    Signal("attn_text_text", "(S, H, T, T)", "attention of every text row (query) to every text column (key) of "
                                             "the sample at L-1 (softmax over all keys; ``text_mask`` marks both "
                                             "axes)", probe=("text",)),
    Signal("keys", "(S, n, Dk)", "post-RoPE key states of the candidates at L-1 (each sample's own rotary "
                                 "phase)", probe=("keys",), causal=True),
    Signal("text_keys", "(S, T, Dk)", "post-RoPE key states of the text tokens at L-1", probe=("keys",)),
    Signal("vision_attn", "(S, n)", "vision-encoder attention each candidate receives: from [CLS] where the "
                                    "tower has one, else mean attention received (pooled to LLM tokens where "
                                    "patches are merged); NaN where a segment has none (video)", vision=True,
           causal=True),
    Signal("vision_keys", "(S, n, Dv)", "vision-encoder key states (same layer)", vision=True, causal=True),
    Signal("layer_attn_last", "(S, Lyr, H, n)", "``attn_last`` at every layer 0..L-1 (information flow)",
           probe=("last",), every_layer=True),
    Signal("layer_attn_full", "(S, Lyr, m, m)", "head-averaged attention among the sample's tokens at every "
                                                "layer 0..L-1 (sequence order; padding rows/columns zero)",
           probe=("full",), every_layer=True),
    Signal("full_pos", "(S, n) long", "column of each candidate in ``layer_attn_full`` (-1 on padding slots)",
           probe=("full",), every_layer=True),
    Signal("full_query", "(S,) long", "column of the sample's last prompt token in ``layer_attn_full``",
           probe=("full",), every_layer=True),
)}

#: Every signal name a scorer may declare in ``needs``.
SIGNAL_NAMES = frozenset(SIGNALS)


@dataclass
class SegmentSignals:
    """Padded per-segment signals of one stage; see :data:`SIGNALS` and the module docstring."""

    mask: torch.Tensor
    budget: torch.Tensor
    index: torch.Tensor
    sample: torch.Tensor
    ordinal: torch.Tensor
    original: torch.Tensor
    grid: Optional[list] = None
    kind: Optional[list] = None
    video: Optional[list] = None
    text_mask: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None
    hidden: Optional[torch.Tensor] = None
    text_hidden: Optional[torch.Tensor] = None
    text_after: Optional[torch.Tensor] = None
    normed_hidden: Optional[torch.Tensor] = None
    normed_text_hidden: Optional[torch.Tensor] = None
    attn_last: Optional[torch.Tensor] = None
    attn_last_text: Optional[torch.Tensor] = None
    attn_text: Optional[torch.Tensor] = None
    attn_text_text: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    text_keys: Optional[torch.Tensor] = None
    vision_attn: Optional[torch.Tensor] = None
    vision_keys: Optional[torch.Tensor] = None
    layer_attn_last: Optional[torch.Tensor] = None
    layer_attn_full: Optional[torch.Tensor] = None
    full_pos: Optional[torch.Tensor] = None
    full_query: Optional[torch.Tensor] = None
    #: Free-form diagnostics a scorer may fill (e.g. ``{"erank": tensor(S,)}``); copied to stats. A
    #: :class:`Deferred` value is computed when it is first read (nothing on the prefill's path).
    diagnostics: dict = field(default_factory=lambda: Diagnostics())

    @property
    def num_segments(self) -> int:
        return int(self.mask.shape[0])

    @property
    def counts(self) -> torch.Tensor:
        """(S,) number of real candidates per segment."""
        return self.mask.sum(dim=1)


class Deferred:
    """A diagnostic computed when it is first read: ``fn(*args)``. For the ones that cost the prefill
    a host sync or a decomposition (the kept tokens' effective rank: an ``eigvalsh`` and a sync,
    ~0.4 ms of an H100 and a stall of the host per DivPrune prefill), which most calls never read.
    ``args`` must be tensors the prefill will not overwrite (the scorers pass the stage's own
    gathers). On CUDA it is computed on the stream that made ``args`` (the reader's stream then
    waits for it), so reading it later from another stream or thread is safe."""

    __slots__ = ("fn", "args", "stream")

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args
        cuda = next((a for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
        self.stream = torch.cuda.current_stream(cuda.device) if cuda is not None else None

    def __call__(self):
        if self.stream is None:
            return self.fn(*self.args)
        # (after what the reader's stream queued: a captured prefill's replay rewrites ``args`` there)
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            out = self.fn(*self.args)
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        return out


class Diagnostics(dict):
    """A scorer's diagnostics (``SegmentSignals.diagnostics``, ``StageStats.diagnostics``): a dict
    whose :class:`Deferred` values are computed at their first read and kept, through every way of
    reading it (``d[k]``, ``get``, ``items``, ``values``, ``dict(d)``, ``{**d}``, ``json``, ``copy``).
    :meth:`unresolved_copy` copies one without computing anything."""

    @classmethod
    def unresolved_copy(cls, other: dict) -> "Diagnostics":
        out = cls()
        for key in dict.keys(other):
            dict.__setitem__(out, key, dict.__getitem__(other, key))
        return out

    def __iter__(self):  # (a dict subclass with its own __iter__ is copied through keys() and d[k])
        return iter(list(dict.keys(self)))

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, Deferred):
            value = value()
            super().__setitem__(key, value)
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def pop(self, key, *default):
        if key not in self:
            return dict.pop(self, key, *default)
        value = self[key]
        dict.__delitem__(self, key)
        return value

    def setdefault(self, key, default=None):
        if key not in self:
            dict.__setitem__(self, key, default)
        return self[key]

    def popitem(self):
        if not dict.__len__(self):
            raise KeyError("popitem(): dictionary is empty")
        key = list(dict.keys(self))[-1]
        return key, self.pop(key)

    def items(self):
        return [(k, self[k]) for k in self]

    def values(self):
        return [self[k] for k in self]

    def __eq__(self, other):
        return isinstance(other, dict) and dict(self.items()) == dict(other.items())

    __hash__ = None

    def __reduce__(self):  # pickled (torch.save, copy) as the plain dict of its computed values
        return dict, (dict(self.items()),)

    def __repr__(self):  # (computes what was deferred)
        return repr(dict(self.items()))
