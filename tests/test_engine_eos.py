"""The static engine's end-of-sequence helpers (vtoken.engine.eos), on hand-written token rows."""

import torch

from vtoken.engine.eos import EndWatch, finish


def test_end_watch_remembers_rows_and_reads_only_new_tokens():
    new = torch.tensor([[5, 9, 1, 1, 1, 1],    # ends at its 2nd token
                        [5, 5, 5, 5, 7, 1]])   # ends at its 5th (EOS ids 9 and 7)
    watch = EndWatch([9, 7])
    assert not watch.all_ended(new[:, :3])          # row 1 has no EOS among 3 tokens
    assert watch.ended.tolist() == [True, False]
    later = new.clone()
    later[0, 1] = 5  # an earlier token changed after the check: not read again, row 0 stays ended
    assert watch.all_ended(later[:, :5]) and watch.seen == 5
    assert not EndWatch([]).all_ended(new)          # no EOS ids: never ended


def test_finish_pads_after_the_first_eos_and_cuts_when_all_ended():
    new = torch.tensor([[5, 9, 3, 9], [9, 4, 4, 4]])
    got = finish(new, [9], 0)
    assert got.tolist() == [[5, 9], [9, 0]]         # both ended: output stops after the later EOS (2nd)
    open_row = torch.tensor([[5, 9, 3], [4, 4, 4]])
    assert finish(open_row, [9], 0).tolist() == [[5, 9, 0], [4, 4, 4]]  # one row open: full length
