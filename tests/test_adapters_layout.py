"""Segment layout from token runs (``vtoken.adapters.base.layout_from_runs``), hand-computed cases;
LLaVA-OneVision's video layout end to end."""

import torch

from vtoken.adapters.base import layout_from_runs


def _row(spec):
    """'T' text, 'V' visual -> bool list."""
    return [c == "V" for c in spec]


def test_sizes_split_a_run_of_adjacent_images():
    # one row, two adjacent images of 3 and 2 tokens in one run, then text
    vis = torch.tensor([_row("TVVVVVT")])
    lay = layout_from_runs(vis, torch.zeros_like(vis, dtype=torch.long), {0: [3, 2]}, {0: [None, None]})
    assert lay.segment_of.tolist() == [[-1, 0, 0, 0, 1, 1, -1]]
    assert lay.seg_count.tolist() == [3, 2] and lay.seg_ordinal.tolist() == [0, 1]


def test_sizes_that_do_not_tile_the_runs_are_ignored():
    # two identical rows (beams of one sample): images of 4 then 2 tokens, each its own run; the
    # sizes arrive image by image ([4, 4, 2, 2], transformers 5.17's beam expansion), not row by row
    row = _row("TVVVVTVVT")
    vis = torch.tensor([row, row])
    lay = layout_from_runs(vis, torch.zeros_like(vis, dtype=torch.long), {0: [4, 4, 2, 2]}, {0: [None] * 4})
    expected = [-1, 0, 0, 0, 0, -1, 1, 1, -1]
    assert lay.segment_of[0].tolist() == expected
    assert lay.segment_of[1].tolist() == [x if x < 0 else x + 2 for x in expected]
    assert lay.seg_count.tolist() == [4, 2, 4, 2]
    assert lay.seg_ordinal.tolist() == [0, 1, 0, 1]
    assert lay.seg_sample.tolist() == [0, 0, 1, 1]


def test_sizes_in_row_order_are_used():
    row = _row("TVVVVTVVT")
    vis = torch.tensor([row, row])
    lay = layout_from_runs(vis, torch.zeros_like(vis, dtype=torch.long), {0: [4, 2, 4, 2]}, {0: [None] * 4})
    assert lay.seg_count.tolist() == [4, 2, 4, 2]


def test_onevision_video_is_one_segment_with_its_frame_grid():
    """A LLaVA-OneVision video (4 frames pooled to 2 x 2, one closing newline) is one segment with
    grid (4, 2, 2), alone and in a batch: transformers 5.17 appends the newline in the forward,
    after ``get_video_features`` (16 feature tokens for 17 placeholders), later versions inside it."""
    import tiny_models as tm
    import vtoken
    from conftest import get_model

    model = get_model("llava_onevision")
    batch = tm.onevision_video_inputs(model, [4, 4])
    alone = dict(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                 pixel_values_videos=batch["pixel_values_videos"][:1])
    with vtoken.apply_pruning(model, method="uniform", keep=6) as h, torch.no_grad():
        for inputs in (alone, batch):
            model(**inputs)
            segments = h.stats.segments
            assert [[(s.kind, s.count, s.grid) for s in row] for row in segments] == \
                [[("video", 16, (4, 2, 2))]] * inputs["input_ids"].shape[0]
