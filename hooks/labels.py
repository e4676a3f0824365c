"""Training labels follow their tokens through a pruned forward.

A model given ``labels`` (B, N) computes its loss on the logits of the sequence its language model
returns; after a stage that sequence is the kept tokens' layout (B, Nn), so the labels are taken
at the same original positions: each kept token's logits predict the next KEPT token's label, and
padding slots of the new layout are ignored (-100). Text tokens are never pruned, so the labels a
fine-tuning set supervises (the answer's tokens) are all kept; dropped visual tokens carry the
ignore index in such sets anyway.

The runtime gives the model a private copy of the labels tensor at the call's start
(:func:`private_labels`) and reshapes that copy in place to the kept layout when the language
model is done (:func:`follow_layout`), before the model computes its loss: the user's tensor is
never touched, and with nothing pruned the copy keeps its values (the loss equals the plain
model's).
"""

from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100  # transformers' loss functions skip this label


def private_labels(names: list, args: tuple, kwargs: dict):
    """(args, kwargs, labels copy) with ``labels`` replaced by a copy, or None without labels."""
    if torch.is_tensor(kwargs.get("labels")):
        labels = kwargs["labels"].clone()
        return args, {**kwargs, "labels": labels}, labels
    if "labels" in names and names.index("labels") < len(args) and torch.is_tensor(args[names.index("labels")]):
        i = names.index("labels")
        labels = args[i].clone()
        return args[:i] + (labels,) + args[i + 1:], kwargs, labels
    return None


def follow_layout(labels: Optional[torch.Tensor], positions: torch.Tensor) -> None:
    """Reshape ``labels`` (B, N) in place to the layout ``positions`` (B, Nn) of original positions
    (-1 = padding slot)."""
    if labels is None or labels.dim() != 2 or labels.shape[0] != positions.shape[0]:
        return
    pos = positions.to(labels.device)
    kept = labels.gather(1, pos.clamp(min=0)).masked_fill(pos < 0, IGNORE_INDEX)
    labels.set_(kept)
