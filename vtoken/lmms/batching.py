"""lmms-eval's ``generate_until`` requests cut into batches: grouped by (task, split, generation
settings) so one batch shares its settings, each group in document order, then fixed slices of
``batch_size`` (the same questions per batch as ``vtoken eval`` over the same data in the same
order)."""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["Batch", "make_batches"]


@dataclass
class Batch:
    indices: list  # positions of the batch's requests in the list lmms-eval passed
    contexts: list  # prompt text of each request (the task's doc_to_text, pre/post prompts included)
    gen_kwargs: dict  # the group's generation settings (a copy)
    doc_to_visual: object  # the task's doc -> visuals function
    doc_ids: list
    task: str
    split: str


def _settings_key(gen_kwargs) -> str:
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)


def make_batches(args: list, batch_size: int) -> list:
    """``args``: each request's ``Instance.args`` = (context, gen_kwargs, doc_to_visual, doc_id, task,
    split). Returns :class:`Batch` objects covering every request once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    groups: dict = {}
    for i, a in enumerate(args):
        if len(a) != 6:
            raise ValueError(
                f"expected generate_until request arguments (context, gen_kwargs, doc_to_visual, doc_id, task, split), "
                f"got {len(a)} values; vtoken's lmms-eval model is a 'simple' model (lmms-eval 0.7.x)")
        context, gen, _, doc_id, task, split = a
        groups.setdefault((task, split, _settings_key(gen)), []).append(i)
    batches = []
    for (task, split, _), idx in groups.items():
        idx.sort(key=lambda i: (args[i][3], i))
        for b0 in range(0, len(idx), batch_size):
            part = idx[b0:b0 + batch_size]
            first = args[part[0]]
            batches.append(Batch(indices=part, contexts=[args[i][0] for i in part], gen_kwargs=dict(first[1] or {}),
                                 doc_to_visual=first[2], doc_ids=[args[i][3] for i in part], task=task, split=split))
    return batches
