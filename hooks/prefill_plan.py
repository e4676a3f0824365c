"""Host-side preparation of a pruning prefill, so the first stage runs without device syncs.

Everything the first stage needs that does not depend on the scores (the candidate slots of
each segment, their index within the segment, the budgets, how many tokens each row keeps) is a
function of ``input_ids``, the 2-D attention mask and the plan. :func:`prepare_prefill` computes
it on the CPU from host copies of those inputs and uploads it with non-blocking copies, before
the language model runs (for LLaVA-1.5 and Qwen-VL: before the vision tower, when the device has
nothing queued, so reading ``input_ids`` back costs no stall). The stage then only launches
device work: scores, top-k, gathers. On an eager launch-bound prefill (7B model, batch 1) each
host sync in the middle of the forward drains the device queue; the generic path of
:mod:`vtoken.hooks.runtime` has ~30 of them, this one none of its own (a scorer may still sync,
e.g. a greedy selection loop; the budget check waits until the forward ends).

Shapes: B batch rows, N prompt tokens, S segments, n the largest candidate count of a segment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import torch

from vtoken.plan import tokens_for


@dataclass
class Candidates:
    """The candidate (prunable, valid, still present) slots of every segment at a stage.

    slot_pad (S, n) long: current slot of each candidate, -1 padding; smask (S, n) bool;
    index (S, n) long: its index within the segment in ORIGINAL order (-1 padding);
    budget (S,) long: tokens the segment keeps; counts (S,) long: its candidates.
    """

    slot_pad: torch.Tensor
    smask: torch.Tensor
    index: torch.Tensor
    budget: torch.Tensor
    counts: torch.Tensor
    cand: torch.Tensor  # (B, Nc) bool candidate slots


def candidates(layout, cur_pos: torch.Tensor, cur_valid: torch.Tensor, index_in_seg: torch.Tensor,
               keep) -> Candidates:
    """Candidates of a stage with budget ``keep`` on the layout ``cur_pos`` (B, Nc) of original
    positions (-1 padding slot) with validity ``cur_valid``. Runs on the tensors' device (one
    host sync for the candidate count on a GPU: the generic path)."""
    safe = cur_pos.clamp(min=0)
    seg = torch.where(cur_pos >= 0, layout.segment_of.gather(1, safe), torch.full_like(cur_pos, -1))
    cand = (cur_pos >= 0) & cur_valid & layout.prunable.gather(1, safe)
    b_idx, slot = cand.nonzero(as_tuple=True)
    S = layout.num_segments
    seg_ids = seg[b_idx, slot]
    counts = torch.bincount(seg_ids, minlength=S)
    offsets = counts.cumsum(0) - counts
    within = torch.arange(seg_ids.numel(), device=seg_ids.device) - offsets[seg_ids]
    n = int(counts.max()) if S > 0 else 0
    slot_pad = torch.full((S, n), -1, dtype=torch.long, device=cur_pos.device)
    slot_pad[seg_ids, within] = slot
    smask = slot_pad >= 0
    sample = layout.seg_sample
    orig = cur_pos[sample.unsqueeze(1), slot_pad.clamp(min=0)]
    index = torch.where(smask, index_in_seg[sample.unsqueeze(1), orig], torch.full_like(orig, -1))
    budget = torch.tensor([tokens_for(keep, int(c)) for c in layout.seg_count.tolist()], dtype=torch.long)
    budget = torch.minimum(budget.to(counts.device), counts)
    return Candidates(slot_pad=slot_pad, smask=smask, index=index, budget=budget, counts=counts, cand=cand)


def running_index(prunable: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """(B, N) index of each prunable token within its segment (-1 elsewhere)."""
    flat_seg = seg.clone()
    flat_seg[~prunable] = -1
    out = torch.full_like(seg, -1)
    bb, jj = prunable.nonzero(as_tuple=True)
    ids = flat_seg[bb, jj]
    if ids.numel():
        counts = torch.bincount(ids)
        offsets = counts.cumsum(0) - counts
        out[bb, jj] = torch.arange(ids.numel(), device=seg.device) - offsets[ids]
    return out


def visual_ordinal(layout) -> torch.Tensor:
    """(B, N) ordinal of each visual token among its sample's visual tokens (-1 elsewhere)."""
    vis = layout.visual
    return torch.where(vis, vis.long().cumsum(1) - 1, torch.full_like(layout.segment_of, -1))


def text_rows(layout, cur_pos: torch.Tensor, cur_valid: torch.Tensor) -> tuple:
    """(B, T) slot indices of valid non-visual tokens (-1 padded), and the (B, T) mask."""
    safe = cur_pos.clamp(min=0)
    is_text = cur_valid & ~layout.visual.gather(1, safe) & (cur_pos >= 0)
    counts = is_text.sum(1)
    T = max(int(counts.max()), 1)
    rows = torch.full((is_text.shape[0], T), -1, dtype=torch.long, device=is_text.device)
    bb, jj = is_text.nonzero(as_tuple=True)
    rank = is_text.long().cumsum(1) - 1
    rows[bb, rank[bb, jj]] = jj
    return rows, rows >= 0


@dataclass
class PreparedPrefill:
    """The device copies of a host-prepared prefill (see :func:`prepare_prefill`)."""

    layout: object  # VisualLayout on the device
    index_in_seg: torch.Tensor  # (B, N)
    vis_ordinal: torch.Tensor  # (B, N)
    first: Candidates  # the first stage's candidates on the original layout
    text: tuple  # text_rows of the original layout
    drop_any: bool  # the first stage drops at least one token (some budget < its count)
    kept_per_row: torch.Tensor  # (B,) tokens each row keeps after an exact-budget first stage
    kept_host: list  # the same, on the host
    all_valid: bool  # every original slot is valid (no padding)
    seg_count_host: list  # prunable tokens of each segment, on the host


def prepare_prefill(layout, valid: torch.Tensor, keep, device) -> PreparedPrefill:
    """Host computation of a prefill's layout-dependent tensors, uploaded to ``device``.

    layout: VisualLayout with CPU tensors; valid (B, N) bool on the CPU (the 2-D attention mask);
    (both on ``device`` also works: the same computation, with host syncs);
    keep: the first stage's budget.
    """
    B, N = valid.shape
    pos = torch.arange(N).expand(B, N)
    index_in_seg = running_index(layout.prunable, layout.segment_of)
    first = candidates(layout, pos, valid, index_in_seg, keep)
    text = text_rows(layout, pos, valid)
    S = layout.num_segments
    kept_cand = torch.zeros(B, dtype=torch.long).index_add_(0, layout.seg_sample, first.budget) if S else torch.zeros(B, dtype=torch.long)
    kept = valid.sum(1) - first.cand.sum(1) + kept_cand
    fields = ("slot_pad", "smask", "index", "budget", "counts", "cand")
    lay_fields = ("segment_of", "structural", "seg_sample", "seg_ordinal", "seg_count")
    host = {"index_in_seg": index_in_seg, "vis_ordinal": visual_ordinal(layout), "kept": kept,
            "text_rows": text[0], "text_mask": text[1]}
    host.update({f"first.{k}": getattr(first, k) for k in fields})
    host.update({f"layout.{k}": getattr(layout, k) for k in lay_fields})
    dev = upload(host, device)
    return PreparedPrefill(
        layout=replace(layout, **{k: dev[f"layout.{k}"] for k in lay_fields}),
        index_in_seg=dev["index_in_seg"],
        vis_ordinal=dev["vis_ordinal"],
        first=Candidates(**{k: dev[f"first.{k}"] for k in fields}),
        text=(dev["text_rows"], dev["text_mask"]),
        drop_any=bool((first.budget < first.counts).any()),
        kept_per_row=dev["kept"],
        kept_host=kept.tolist(),
        all_valid=bool(valid.all()),
        seg_count_host=layout.seg_count.tolist(),
    )


def upload(tensors: dict, device) -> dict:
    """Copies of the integer / bool ``tensors`` (name -> tensor) on ``device``, in ONE host ->
    device transfer that does not block the host (packed into one pinned int64 buffer on CUDA;
    moved as they are otherwise)."""
    device = torch.device(device)
    if device.type != "cuda" or all(t.device == device for t in tensors.values()):
        return {k: t.to(device) for k, t in tensors.items()}
    flat = {k: t.reshape(-1).to("cpu", torch.int64) for k, t in tensors.items()}
    packed = torch.cat(list(flat.values())).pin_memory().to(device, non_blocking=True)
    out, start = {}, 0
    for k, t in tensors.items():
        piece = packed[start: start + flat[k].numel()].view(t.shape)
        out[k] = piece.bool() if t.dtype == torch.bool else piece.to(t.dtype)
        start += flat[k].numel()
    return out
