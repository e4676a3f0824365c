"""End of sequence for the static engine's greedy decode (the argmax inside the captured step).

- :func:`finish` ``(new [B, T], eos_ids, pad) -> [B, T']``: as ``model.generate`` leaves its
  output: tokens after a row's first EOS become ``pad``; once every row has ended, the output
  stops after the last row's EOS (``T'`` = that length), else ``T' = T``.
- :func:`all_ended` ``(new [B, k], eos_ids) -> bool``: every row holds an EOS among its first
  ``k`` tokens. The decode loop asks every :data:`CHECK_EVERY` steps (one host sync each), so a
  batch whose answers end early stops within that many steps of its last EOS instead of running
  to ``max_new_tokens`` (``generate`` stops at once: it syncs every step).
"""

from __future__ import annotations

import torch

__all__ = ["CHECK_EVERY", "all_ended", "finish"]

#: decode steps between two "has every row ended?" checks
CHECK_EVERY = 8


def _is_eos(new: torch.Tensor, eos_ids: list) -> torch.Tensor:
    is_eos = torch.zeros_like(new, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= new == e
    return is_eos


def all_ended(new: torch.Tensor, eos_ids: list) -> bool:
    return bool(eos_ids) and bool(_is_eos(new, eos_ids).any(1).all())


def finish(new: torch.Tensor, eos_ids: list, pad: int) -> torch.Tensor:
    if not eos_ids:
        return new
    is_eos = _is_eos(new, eos_ids)
    ended_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    new = new.masked_fill(ended_before, pad)
    done = is_eos.any(1)
    if bool(done.all()):
        length = int((is_eos.long().argmax(1) + 1).max())
        new = new[:, :length]
    return new
