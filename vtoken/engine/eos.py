"""End of sequence for the static engine's greedy decode (the argmax inside the captured step).

- :func:`finish` ``(new [B, T], eos_ids, pad) -> [B, T']``: as ``model.generate`` leaves its
  output: tokens after a row's first EOS become ``pad``; once every row has ended, the output
  stops after the last row's EOS (``T'`` = that length), else ``T' = T``.
- :func:`special_ids` ``(generation_config, eos_token_id, pad_token_id, suppress_tokens)``: the EOS
  ids (a list), the pad id and the suppressed ids (a tuple, or None), read on the host once, before
  any of the call's work is queued on the device.
- :class:`EndWatch` ``(eos_ids)``: ``.all_ended(new [B, k]) -> bool``: every row holds an EOS
  among its first ``k`` tokens, reading only the tokens written since its previous call (a row
  that has ended stays ended). The decode loop asks every :data:`CHECK_EVERY` steps (one host sync
  each), so a batch whose answers end early stops within that many steps of its last EOS instead
  of running to ``max_new_tokens`` (``generate`` stops at once: it syncs every step).
"""

from __future__ import annotations

import torch

__all__ = ["CHECK_EVERY", "EndWatch", "finish", "special_ids"]

#: decode steps between two "has every row ended?" checks
CHECK_EVERY = 8


def _ids(tokens) -> list:
    """An int, a sequence of ints or a tensor of ids, as a list of ints (a tensor read once)."""
    if torch.is_tensor(tokens):
        return tokens.reshape(-1).tolist()
    return [int(tokens)] if isinstance(tokens, int) else [int(t) for t in tokens]


def special_ids(gen_cfg, eos_token_id=None, pad_token_id=None, suppress_tokens=None) -> tuple:
    """(EOS ids list, pad id, suppressed ids tuple or None): the arguments, else the model's
    generation config; the pad id defaults to the first EOS id, else 0."""
    eos = eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None)
    pad = pad_token_id if pad_token_id is not None else getattr(gen_cfg, "pad_token_id", None)
    eos_ids = [] if eos is None else _ids(eos)
    pad = (eos_ids[0] if eos_ids else 0) if pad is None else int(pad)
    return eos_ids, pad, None if suppress_tokens is None else tuple(_ids(suppress_tokens)) or None


def _is_eos(new: torch.Tensor, eos_ids: list) -> torch.Tensor:
    is_eos = torch.zeros_like(new, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= new == e
    return is_eos


class EndWatch:
    """Which rows of one decode have ended, kept between checks (``ended``: ``[B]`` bool)."""

    def __init__(self, eos_ids: list):
        self.eos_ids = list(eos_ids)
        self.ended = None
        self.seen = 0  # tokens of each row already read

    def all_ended(self, new: torch.Tensor) -> bool:
        """``new``: ``[B, k]``, the tokens so far (the first ``seen`` columns as at the last call)."""
        if not self.eos_ids:
            return False
        window = _is_eos(new[:, self.seen:], self.eos_ids).any(1)
        self.ended = window if self.ended is None else self.ended | window
        self.seen = new.shape[1]
        return bool(self.ended.all())


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
