"""Build :class:`vtoken.signals.SegmentSignals` by hand, for tests and for writing custom scorers.

    sig = make_signals(counts=[5, 3], budget=[2, 1], attn_last=[a0, a1])

Per-segment tensors are given as lists (one entry per segment, first axis = that segment's
candidates, or its text rows for text signals) and padded here; padding is zeros, masks mark
the real slots. Index of candidate j is j unless ``index`` is given.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from vtoken.signals import SegmentSignals

# per-segment layout of each signal: which axis holds the candidates (n) / text rows (T)
_CAND_AXIS = {"hidden": 0, "normed_hidden": 0, "keys": 0, "vision_keys": 0, "vision_attn": 0, "attn_last": 1,
              "layer_attn_last": 2}
_TEXT_AXIS = {"text_hidden": 0, "normed_text_hidden": 0, "text_keys": 0, "attn_last_text": 1}


def _pad_axis(items: Sequence[torch.Tensor], axis: int, size: int) -> torch.Tensor:
    out = []
    for t in items:
        t = torch.as_tensor(t)
        pad = [0, 0] * t.dim()
        pad[2 * (t.dim() - 1 - axis) + 1] = size - t.shape[axis]
        out.append(torch.nn.functional.pad(t, pad))
    return torch.stack(out)


def make_signals(
    counts: Sequence[int],
    budget: Sequence[int],
    text_counts: Optional[Sequence[int]] = None,
    index: Optional[Sequence[Sequence[int]]] = None,
    original: Optional[Sequence[int]] = None,
    grid: Optional[list] = None,
    sample: Optional[Sequence[int]] = None,
    kind: Optional[list] = None,
    video: Optional[list] = None,
    **signals,
) -> SegmentSignals:
    """Padded SegmentSignals from per-segment tensors (see the module docstring).

    ``attn_text`` entries are (H, T_s, n_s), ``attn_text_text`` (H, T_s, T_s); every other signal follows the shapes of
    :mod:`vtoken.signals` without the leading S axis. Unknown keyword names are set as extra
    attributes, unpadded (e.g. ``layer_attn_full``, already padded by the caller).
    """
    S = len(counts)
    n = max(counts) if S else 0
    mask = torch.zeros((S, n), dtype=torch.bool)
    idx = torch.full((S, n), -1, dtype=torch.long)
    for s, c in enumerate(counts):
        mask[s, :c] = True
        idx[s, :c] = torch.as_tensor(index[s]) if index is not None else torch.arange(c)
    sig = SegmentSignals(
        mask=mask,
        budget=torch.as_tensor(list(budget), dtype=torch.long),
        index=idx,
        sample=torch.as_tensor(list(sample) if sample is not None else range(S), dtype=torch.long),
        ordinal=torch.zeros(S, dtype=torch.long),
        original=torch.as_tensor(list(original) if original is not None else list(counts), dtype=torch.long),
        grid=grid,
        kind=kind,
        video=video,
    )
    T = None
    if text_counts is not None:
        T = max(max(text_counts), 1) if S else 1
        tm = torch.zeros((S, T), dtype=torch.bool)
        for s, c in enumerate(text_counts):
            tm[s, :c] = True
        sig.text_mask = tm
    for name, items in signals.items():
        if name in _CAND_AXIS:
            setattr(sig, name, _pad_axis([torch.as_tensor(t).float() for t in items], _CAND_AXIS[name], n))
        elif name in _TEXT_AXIS:
            if T is None:
                raise ValueError(f"{name} needs text_counts")
            setattr(sig, name, _pad_axis([torch.as_tensor(t).float() for t in items], _TEXT_AXIS[name], T))
        elif name == "text_after":  # bool (T_s,) per segment
            if T is None:
                raise ValueError("text_after needs text_counts")
            sig.text_after = _pad_axis([torch.as_tensor(t, dtype=torch.bool).long() for t in items], 0, T).bool()
        elif name == "attn_text_text":  # (H, T_s, T_s) per segment
            if T is None:
                raise ValueError("attn_text_text needs text_counts")
            padded = [_pad_axis([torch.as_tensor(t).float()], 2, T)[0] for t in items]
            sig.attn_text_text = _pad_axis(padded, 1, T)
        elif name == "attn_text":
            if T is None:
                raise ValueError("attn_text needs text_counts")
            padded = [_pad_axis([torch.as_tensor(t).float()], 2, n)[0] for t in items]
            sig.attn_text = _pad_axis(padded, 1, T)
        else:
            setattr(sig, name, items)
    return sig


def random_signals(
    counts: Sequence[int],
    budget: Sequence[int],
    text_counts: Optional[Sequence[int]] = None,
    heads: int = 4,
    dim: int = 16,
    key_dim: int = 8,
    layers: int = 2,
    seed: int = 0,
) -> dict:
    """Random per-segment signals (every base signal, plus the full-attention rollout signals)
    as keyword arguments for :func:`make_signals`; attention rows are softmax-normalised.
    ``normed_hidden`` / ``normed_text_hidden`` are the hidden states times fixed per-dimension
    weights (a final RMSNorm's weights, up to the per-row scale cosines ignore); ``text_after``
    marks the last two thirds of each segment's text rows (rounded up).

    Each segment is drawn from its own generator (seed, segment number, count), so a segment's
    signals do not depend on the other segments -- handy for batch-vs-single checks.
    """
    text_counts = list(text_counts) if text_counts is not None else [3] * len(counts)
    out = {k: [] for k in ("hidden", "keys", "vision_keys", "vision_attn", "attn_last", "layer_attn_last",
                           "text_hidden", "text_keys", "attn_last_text", "attn_text")}
    out.update(normed_hidden=[], normed_text_hidden=[], text_after=[])
    weight = torch.linspace(0.25, 2.0, dim)  # deterministic: no draw from the segments' generators
    fulls, poss, queries = [], [], []
    for s, (c, t) in enumerate(zip(counts, text_counts)):
        g = torch.Generator().manual_seed(seed * 7919 + s * 104729 + c)
        row = torch.softmax(torch.randn(heads, c + t, generator=g) * 2, dim=-1)
        out["attn_last"].append(row[:, :c])
        out["attn_last_text"].append(row[:, c:])
        out["hidden"].append(torch.randn(c, dim, generator=g))
        out["keys"].append(torch.randn(c, key_dim, generator=g))
        out["vision_keys"].append(torch.randn(c, key_dim, generator=g))
        out["vision_attn"].append(torch.softmax(torch.randn(c, generator=g) * 2, dim=-1))
        out["layer_attn_last"].append(torch.softmax(torch.randn(layers, heads, c, generator=g) * 2, dim=-1))
        out["text_hidden"].append(torch.randn(t, dim, generator=g))
        out["text_keys"].append(torch.randn(t, key_dim, generator=g))
        out["attn_text"].append(torch.softmax(torch.randn(heads, t, c, generator=g) * 2, dim=-1))
        m = c + t + 1  # [visual..., text..., last token]
        a = torch.softmax(torch.randn(layers, m, m, generator=g) * 2 + torch.triu(torch.full((m, m), -1e4), 1), dim=-1)
        fulls.append(a)
        out["normed_hidden"].append(out["hidden"][-1] * weight)
        out["normed_text_hidden"].append(out["text_hidden"][-1] * weight)
        out["text_after"].append(torch.arange(t) >= t // 3)
        poss.append(torch.arange(c))
        queries.append(m - 1)
    M = max(f.shape[-1] for f in fulls) if fulls else 1
    n = max(counts) if counts else 0
    full = torch.zeros(len(counts), layers, M, M)
    pos = torch.full((len(counts), n), -1, dtype=torch.long)
    for s, f in enumerate(fulls):
        full[s, :, : f.shape[-1], : f.shape[-1]] = f
        pos[s, : poss[s].numel()] = poss[s]
    out.update(layer_attn_full=full, full_pos=pos, full_query=torch.tensor(queries, dtype=torch.long))
    return dict(counts=counts, budget=budget, text_counts=text_counts, **out)


def permute_slots(sig: SegmentSignals, seed: int, names=("mask", "index", "hidden")) -> SegmentSignals:
    """Shuffle the slots of ``sig`` (the same permutation in every row, for the signals ``names``),
    so real slots sit among padding and need not be in original order; returns ``sig``."""
    perm = torch.randperm(sig.mask.shape[1], generator=torch.Generator().manual_seed(seed))
    for name in names:
        setattr(sig, name, getattr(sig, name)[:, perm])
    return sig


__all__ = ["make_signals", "random_signals", "permute_slots"]
