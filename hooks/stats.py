"""Token accounting of the last pruned prefill (what ``handle.stats`` returns).

Indices are positions within a sample's visual tokens (0 = its first image/video token, in
prompt order, image-newline tokens included); ``counts`` are per segment (image / video) and
exclude structural tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from vtoken.plan import equivalent_tokens


@dataclass
class SegmentInfo:
    offset: int  # first visual-token index of the segment within its sample
    length: int  # visual tokens of the segment (structural included)
    count: int  # prunable tokens (the budget's reference)
    grid: Optional[tuple]  # (t, h, w) token grid, or None
    kind: str  # "image" or "video"


@dataclass
class StageStats:
    layer: int
    scorer: str
    mode: str
    kept: list  # per sample: 1-D LongTensor, visual-token indices alive after this stage
    counts: list  # per sample: [kept prunable tokens per segment]
    scores: list  # per sample: 1-D float tensor over the sample's visual tokens (NaN = not scored)
    diagnostics: dict = field(default_factory=dict)


@dataclass
class PruneStats:
    stages: list
    visual_tokens: list  # per sample
    segments: list  # per sample: [SegmentInfo]
    context_tokens: list  # per sample: (tokens before pruning, tokens after the last stage)
    equivalent_tokens: list  # per sample: layer-averaged visual tokens (docs/DESIGN.md §4)
    num_layers: int
    #: (B, N') original sequence position of every token slot after the last stage (-1 =
    #: padding slot); the model's outputs (logits, hidden states) come in this layout.
    positions: Optional[torch.Tensor] = None

    @property
    def kept_per_stage(self) -> list:
        """[[visual tokens kept by sample b after stage i] for i] for b."""
        return [[int(st.kept[b].numel()) for st in self.stages] for b in range(len(self.visual_tokens))]

    def summary(self) -> str:
        lines = []
        for b, segs in enumerate(self.segments):
            per = ", ".join(f"L{st.layer}:{sum(st.counts[b])}" for st in self.stages)
            lines.append(
                f"sample {b}: {self.visual_tokens[b]} visual tokens in {len(segs)} segment(s); kept {per}; "
                f"equivalent {self.equivalent_tokens[b]:.1f}"
            )
        return "\n".join(lines)


def _ordinal_table(segment_of, prunable, vis_ordinal, num_segments: int) -> torch.Tensor:
    """(S, n) long: ``[s, j]`` = visual-token index of segment s's j-th prunable token (-1 past
    its end); every argument on the host, ``segment_of`` / ``prunable`` / ``vis_ordinal`` (B, N)."""
    b_idx, i_idx = (prunable & (segment_of >= 0)).nonzero(as_tuple=True)  # row-major: in prompt order
    seg = segment_of[b_idx, i_idx]
    seg, order = torch.sort(seg, stable=True)
    ords = vis_ordinal[b_idx, i_idx][order]
    per = torch.bincount(seg, minlength=num_segments)
    start = torch.cumsum(per, 0) - per
    j = torch.arange(seg.numel()) - start[seg]
    table = torch.full((num_segments, max(int(per.max()) if num_segments else 0, 1)), -1, dtype=torch.long)
    table[seg, j] = ords
    return table


def build_stats(trace, layout, vis_ordinal, num_layers: int, orig_valid=None) -> PruneStats:
    """The :class:`PruneStats` of one prefill from its stage ``trace`` and original ``layout``.

    Each device tensor is copied to the host once and the per-sample work runs there, so a batch
    of B samples costs a fixed number of device->host copies, not a few per sample (``vtoken eval``
    reads the stats after every batch of 128; on a shared GPU each sync waits its turn)."""
    B = vis_ordinal.shape[0]
    S = layout.num_segments
    segment_of = layout.segment_of.cpu()
    prunable = layout.prunable.cpu()
    vis_ord = vis_ordinal.cpu()
    seg_sample = layout.seg_sample.tolist()
    seg_count = layout.seg_count.tolist()
    vis_counts = (segment_of >= 0).sum(1).tolist()
    table = _ordinal_table(segment_of, prunable, vis_ord, S)
    # each segment's first visual-token index and length (structural tokens included)
    in_any = segment_of >= 0
    seg_all, ord_all = segment_of[in_any], vis_ord[in_any]
    lengths = torch.bincount(seg_all, minlength=S).tolist()
    offsets = torch.full((S,), -1, dtype=torch.long).scatter_reduce(
        0, seg_all, ord_all, "amin", include_self=False).tolist()
    segments = [[] for _ in range(B)]
    for s in range(S):
        segments[seg_sample[s]].append(SegmentInfo(
            offset=offsets[s] if lengths[s] else 0, length=int(lengths[s]), count=int(seg_count[s]),
            grid=layout.seg_grid[s], kind=layout.seg_kind[s]))
    stages = []
    for tr in trace:
        pos = tr.positions
        ords = torch.where(pos >= 0, vis_ordinal.gather(1, pos.clamp(min=0)), torch.full_like(pos, -1)).tolist()
        kept = [torch.tensor([o for o in row if o >= 0], dtype=torch.long) for row in ords]
        seg_kept = tr.seg_keep.sum(1).tolist()
        tr_sample = tr.seg_sample.tolist()
        counts = [[] for _ in range(B)]
        for s in range(len(seg_kept)):
            counts[tr_sample[s]].append(int(seg_kept[s]))
        scores_all = torch.full((B, max(vis_counts, default=0) or 1), float("nan"), dtype=torch.float32)
        if tr.seg_scores is not None:
            idx = tr.seg_index.cpu()
            s_i, j_i = (idx >= 0).nonzero(as_tuple=True)
            rows = torch.tensor(tr_sample, dtype=torch.long)[s_i]
            scores_all[rows, table[s_i, idx[s_i, j_i]]] = tr.seg_scores.float().cpu()[s_i, j_i]
        scores = [scores_all[b, : int(vis_counts[b])].clone() for b in range(B)]
        stages.append(StageStats(tr.layer, tr.scorer, tr.mode, kept, counts, scores, tr.diagnostics))
    layers = [st.layer for st in stages]
    equiv = [equivalent_tokens(layers, [int(st.kept[b].numel()) for st in stages], float(vis_counts[b]), num_layers)
             for b in range(B)]
    last = trace[-1].positions if trace else None
    if orig_valid is not None:
        before = orig_valid.sum(1).tolist()
    else:
        before = [int(vis_ordinal.shape[1])] * B
    after = list(before)
    if last is not None:
        alive = last >= 0
        if orig_valid is not None:
            alive = alive & orig_valid.gather(1, last.clamp(min=0)).bool()
        after = alive.sum(1).tolist()
    context = [(int(x), int(y)) for x, y in zip(before, after)]
    return PruneStats(stages, [int(v) for v in vis_counts], segments, context, equiv, num_layers,
                      positions=last.cpu() if last is not None else None)
