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


def build_stats(trace, layout, vis_ordinal, num_layers: int, orig_valid=None) -> PruneStats:
    B = vis_ordinal.shape[0]
    visual = layout.visual
    vis_counts = visual.sum(1).tolist()
    prunable = layout.prunable
    segments = [[] for _ in range(B)]
    seg_ords = []
    for s in range(layout.num_segments):
        b = int(layout.seg_sample[s])
        in_seg = layout.segment_of[b] == s
        ords = vis_ordinal[b][in_seg & prunable[b]]
        all_ords = vis_ordinal[b][in_seg]
        seg_ords.append(ords)
        segments[b].append(
            SegmentInfo(
                offset=int(all_ords.min()) if all_ords.numel() else 0,
                length=int(all_ords.numel()),
                count=int(layout.seg_count[s]),
                grid=layout.seg_grid[s],
                kind=layout.seg_kind[s],
            )
        )
    stages = []
    for tr in trace:
        pos = tr.positions
        ords = torch.where(pos >= 0, vis_ordinal.gather(1, pos.clamp(min=0)), torch.full_like(pos, -1))
        kept = [ords[b][ords[b] >= 0].cpu() for b in range(B)]
        seg_kept = tr.seg_keep.sum(1).tolist()
        counts = [[] for _ in range(B)]
        scores = [torch.full((int(vis_counts[b]),), float("nan"), dtype=torch.float32) for b in range(B)]
        for s in range(len(seg_kept)):
            b = int(tr.seg_sample[s])
            counts[b].append(int(seg_kept[s]))
            if tr.seg_scores is not None:
                idx = tr.seg_index[s]
                ok = idx >= 0
                scores[b][seg_ords[s][idx[ok]].cpu()] = tr.seg_scores[s][ok].float().cpu()
        stages.append(StageStats(tr.layer, tr.scorer, tr.mode, kept, counts, scores, tr.diagnostics))
    layers = [st.layer for st in stages]
    equiv = []
    context = []
    for b in range(B):
        per_stage = [int(st.kept[b].numel()) for st in stages]
        equiv.append(equivalent_tokens(layers, per_stage, float(vis_counts[b]), num_layers))
    last = trace[-1].positions if trace else None
    for b in range(B):
        before = int(orig_valid[b].sum()) if orig_valid is not None else int(vis_ordinal.shape[1])
        after = before
        if last is not None:
            kept = last[b][last[b] >= 0]
            after = int(orig_valid[b][kept].sum()) if orig_valid is not None else int(kept.numel())
        context.append((before, after))
    return PruneStats(stages, [int(v) for v in vis_counts], segments, context, equiv, num_layers,
                      positions=last.cpu() if last is not None else None)
