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

import threading
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
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


def kept_slots(base: torch.Tensor, cand_flat: torch.Tensor, keep: torch.Tensor, shape) -> torch.Tensor:
    """(B, N) bool: the slots a stage keeps, in ONE scatter.

    base (B*N + 1,) bool: slots kept whatever the scorer says (present, valid, not candidates),
    flattened, plus a spare last entry; cand_flat (S, n) long: flat slot ``b * N + j`` of each
    candidate (``B * N``, the spare, on padding); keep (S, n) bool: the scorer's choice (False on
    padding)."""
    B, N = shape
    return base.scatter(0, cand_flat.reshape(-1), keep.reshape(-1))[: B * N].view(B, N)


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
    """The device copies of a host-prepared prefill (see :func:`prepare_prefill`).

    ``index_in_seg`` (B, N), ``vis_ordinal`` (B, N) and ``text`` (the original layout's text
    rows and their mask, (B, T)) are computed and uploaded on first use: a one-stage plan whose
    scorer reads no text signal never needs them inside the forward (stats read the ordinals
    later)."""

    layout: object  # VisualLayout on the device
    first: Candidates  # the first stage's candidates on the original layout
    drop_any: bool  # the first stage drops at least one token (some budget < its count)
    kept_host: list  # (B,) tokens each row keeps after an exact-budget first stage
    all_valid: bool  # every original slot is valid (no padding)
    seg_count_host: list  # prunable tokens of each segment, on the host
    keep_base: torch.Tensor  # (B*N + 1,) bool, see kept_slots
    cand_flat: torch.Tensor  # (S, n) long, see kept_slots
    rank_shift: torch.Tensor  # (B, 1) long: max(kept) - kept - 1
    last_valid: torch.Tensor  # (B, 1) long: slot of each row's last valid token (0 for an empty row)
    arange: torch.Tensor  # (N,) long: 0..N-1 (the original layout's positions, without a launch)
    host: dict = field(default_factory=dict, repr=False)  # NumPy arrays the lazy fields derive from
    device: object = None

    @cached_property
    def index_in_seg(self) -> torch.Tensor:
        return upload({"x": self.host["index_in_seg"]}, self.device)["x"]

    @cached_property
    def vis_ordinal(self) -> torch.Tensor:
        vis = self.host["vis"]
        return upload({"x": np.where(vis, np.cumsum(vis, axis=1) - 1, -1)}, self.device)["x"]

    @cached_property
    def text(self) -> tuple:
        is_text = self.host["ok"] & ~self.host["vis"]
        B = is_text.shape[0]
        T = max(int(is_text.sum(1).max()), 1) if B else 1
        tb, tj = np.nonzero(is_text)
        rows = np.full((B, T), -1, dtype=np.int64)
        rows[tb, (np.cumsum(is_text, axis=1) - 1)[tb, tj]] = tj
        dev = upload({"rows": rows, "mask": rows >= 0}, self.device)
        return dev["rows"], dev["mask"]


def prepare_prefill(layout, valid: torch.Tensor, keep, device) -> PreparedPrefill:
    """Host computation of a prefill's layout-dependent tensors, uploaded to ``device``.

    layout: VisualLayout (CPU tensors; device ones are copied back); valid (B, N) bool, the 2-D
    attention mask; keep: the first stage's budget. The arithmetic runs in NumPy on the host
    (a few microseconds per operation instead of a PyTorch CPU op's dispatch cost: the eager
    7B prefill at batch 1 is bound by host time, benchmarks/profile/); it is the first stage of
    :func:`candidates` and :func:`text_rows` on the original layout (tests/test_host_syncs.py
    checks them against each other).
    """
    seg = layout.segment_of.cpu().numpy()
    B, N = seg.shape
    ok = valid.cpu().numpy().astype(bool)
    vis = seg >= 0
    prunable = vis & ~layout.structural.cpu().numpy().astype(bool)
    sample = layout.seg_sample.cpu().numpy()
    seg_count = layout.seg_count.cpu().numpy()
    S = int(sample.size)
    # index of every prunable token within its segment (segments are numbered row-major)
    index_in_seg = np.full((B, N), -1, dtype=np.int64)
    index_in_seg[prunable] = _rank_within(seg[prunable], S)[1]
    # the first stage's candidates: every valid prunable token of the original layout
    cand = ok & prunable
    b_idx, slot = np.nonzero(cand)
    seg_ids = seg[b_idx, slot]
    counts, within = _rank_within(seg_ids, S)
    n = int(counts.max()) if S else 0
    slot_pad = np.full((S, n), -1, dtype=np.int64)
    slot_pad[seg_ids, within] = slot
    smask = slot_pad >= 0
    index = np.where(smask, index_in_seg[sample[:, None], np.maximum(slot_pad, 0)], -1)
    budget = np.minimum([tokens_for(keep, int(c)) for c in seg_count.tolist()], counts).astype(np.int64)
    kept = ok.sum(1) - cand.sum(1) + np.bincount(sample, weights=budget, minlength=B).astype(np.int64)
    # for kept_slots / the re-layout: slots kept whatever the scores, candidates' flat slots and
    # the rank offset that puts each row's kept tokens flush right (new padding on the left)
    keep_base = np.append((ok & ~cand).reshape(-1), False)
    cand_flat = np.where(smask, sample[:, None] * N + slot_pad, B * N)
    rank_shift = (kept.max() if B else 0) - kept - 1
    last_valid = np.where(ok.any(1), N - 1 - np.argmax(ok[:, ::-1], axis=1), 0)
    arrays = {"first.slot_pad": slot_pad, "first.smask": smask, "first.index": index, "first.budget": budget,
              "first.counts": counts, "first.cand": cand,
              "keep_base": keep_base, "cand_flat": cand_flat, "rank_shift": rank_shift[:, None],
              "last_valid": last_valid[:, None], "arange": np.arange(N),
              "layout.segment_of": seg, "layout.structural": prunable ^ vis, "layout.seg_sample": sample,
              "layout.seg_ordinal": layout.seg_ordinal.cpu().numpy(), "layout.seg_count": seg_count}
    dev = upload(arrays, device)
    lay_fields = ("segment_of", "structural", "seg_sample", "seg_ordinal", "seg_count")
    fields = ("slot_pad", "smask", "index", "budget", "counts", "cand")
    return PreparedPrefill(
        layout=replace(layout, **{k: dev[f"layout.{k}"] for k in lay_fields}),
        first=Candidates(**{k: dev[f"first.{k}"] for k in fields}),
        drop_any=bool((budget < counts).any()),
        kept_host=kept.tolist(),
        all_valid=bool(ok.all()),
        seg_count_host=seg_count.tolist(),
        keep_base=dev["keep_base"],
        cand_flat=dev["cand_flat"],
        rank_shift=dev["rank_shift"],
        last_valid=dev["last_valid"],
        arange=dev["arange"],
        host={"index_in_seg": index_in_seg, "vis": vis, "ok": ok},
        device=device,
    )


def _rank_within(ids: np.ndarray, S: int) -> tuple:
    """ids (k,): segment of each item, items in row-major order (so grouped by segment) ->
    (count per segment (S,), rank of each item within its segment (k,))."""
    counts = np.bincount(ids, minlength=S).astype(np.int64)
    return counts, np.arange(ids.size) - (np.cumsum(counts) - counts)[ids]


def upload(arrays: dict, device) -> dict:
    """Long / bool tensors on ``device`` from the NumPy ``arrays`` (name -> integer or bool
    array), in ONE host -> device transfer that launches no kernel: the arrays are packed as
    bytes (int64 ones first, so every slice stays 8-byte aligned) into one buffer, pinned on CUDA
    and copied without blocking the host; each tensor is then a view of a slice of one int64 or
    one bool view of it (two splits, one reshape per tensor: this runs on the host path of every
    new prompt)."""
    device = torch.device(device)
    items = [(k, np.asarray(a)) for k, a in arrays.items()]
    bad = [k for k, a in items if a.dtype.kind not in "biu"]
    if bad:
        raise TypeError(f"upload takes integer or bool arrays; {bad} are not")
    ints = [(k, a) for k, a in items if a.dtype.kind != "b"]
    bools = [(k, a) for k, a in items if a.dtype.kind == "b"]
    if not any(a.size for _, a in items):  # nothing to copy (e.g. an empty batch)
        return {k: torch.empty(a.shape, dtype=torch.bool if a.dtype.kind == "b" else torch.int64, device=device)
                for k, a in items}
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # a graph would copy from this host buffer again at every replay, after it is freed
        raise RuntimeError("vtoken: a host plan is uploaded inside a CUDA graph capture; warm the capture up "
                           "on its stream first (the plan is then cached)")
    raw = [np.ascontiguousarray(a, dtype=np.int64).reshape(-1).view(np.uint8) for _, a in ints]
    raw += [np.ascontiguousarray(a, dtype=bool).reshape(-1).view(np.uint8) for _, a in bools]
    packed = torch.from_numpy(np.concatenate(raw))
    packed = packed.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else packed.to(device)
    n_int = 8 * sum(a.size for _, a in ints)
    out = {}
    for group, view, dtype in ((ints, packed[:n_int], torch.int64), (bools, packed[n_int:], torch.bool)):
        if group:
            for (k, a), piece in zip(group, view.view(dtype).split([a.size for _, a in group])):
                out[k] = piece.view(a.shape)
    return {k: out[k] for k, _ in items}


class PlanCache:
    """Host plans kept across calls, keyed by what they are a function of.

    A :class:`PreparedPrefill` depends only on ``input_ids`` (where the visual placeholders sit),
    the 2-D attention mask, the layout inputs the adapter declares (``Adapter.layout_inputs``, e.g.
    Qwen's ``image_grid_thw``), the first stage's budget and the device: never on pixels or
    scores. A repeated prompt template (the same question about many images, a captioning or
    classification prompt, a batch re-run) therefore reuses the plan and skips the host layout,
    the NumPy arithmetic and the upload (about 1 ms of the launch-bound 7B prefill at batch 1;
    benchmarks/profile/). The cached device tensors are only read: the runtime derives new
    tensors from them and scorers must not modify their signals in place. ``size`` entries,
    least recently used evicted first; ``size=0`` disables caching.
    """

    def __init__(self, size: int = 32):
        self.size = size
        self.entries: dict = {}  # insertion order = recency (a hit is re-inserted at the end)
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(ids_host: torch.Tensor, mask_host, extra: dict, keep, device) -> tuple:
        """ids_host (B, N) and mask_host (B, N) bool or None on the CPU; extra: name -> tensor or
        other value of the declared layout inputs."""
        parts = []
        for name in sorted(extra):
            value = extra[name]
            if torch.is_tensor(value):
                value = (tuple(value.shape), str(value.dtype), value.detach().cpu().numpy().tobytes())
            parts.append((name, value if value is None or isinstance(value, tuple) else repr(value)))
        mask = None if mask_host is None else mask_host.numpy().tobytes()
        return (tuple(ids_host.shape), str(ids_host.dtype), ids_host.numpy().tobytes(), mask, tuple(parts),
                repr(keep), str(device))

    def get(self, key):
        with self.lock:
            hit = self.entries.pop(key, None)
            if hit is None:
                self.misses += 1
                return None
            self.entries[key] = hit
            self.hits += 1
            return hit

    def put(self, key, prepared) -> None:
        if self.size <= 0:
            return
        with self.lock:
            self.entries.pop(key, None)
            self.entries[key] = prepared
            self._evict()

    def resize(self, size: int) -> None:
        with self.lock:
            self.size = size
            self._evict()

    def _evict(self) -> None:
        while len(self.entries) > max(self.size, 0):
            del self.entries[next(iter(self.entries))]  # the least recently used

    def clear(self) -> None:
        """Drop every plan and reset the hit / miss counters."""
        with self.lock:
            self.entries.clear()
            self.hits = self.misses = 0
