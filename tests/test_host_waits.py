"""vtoken.bench.host_waits counts what would wait for the GPU, each call once, by op and by site."""

import torch

from vtoken.bench.host_waits import (SIZE_SYNC_OPS, SYNC_OPS, SyncCounter, TransferCounter, call_site, count_syncs,
                                     recording)
from vtoken.engine.eos import finish


def test_counts_each_waiting_call_once_and_nothing_else():
    t = torch.arange(6.0)
    mask = t > 2
    counter = SyncCounter(SYNC_OPS | SIZE_SYNC_OPS)
    with counter:
        t.sum().item()                                   # 1 _local_scalar_dense
        t.nonzero()                                      # 1 nonzero
        t[mask]                                          # 1 bool index
        t[torch.tensor([0, 2])]                          # an integer index: no wait
        torch.repeat_interleave(t, torch.full((6,), 2))  # 1: sized from the counts
        torch.repeat_interleave(t, torch.full((6,), 2), output_size=12)  # sized by the caller: no wait
        t * 2 + 1                                        # no wait
    assert counter.found == {"aten._local_scalar_dense.default": 1, "aten.nonzero.default": 1,
                             "aten.index.Tensor": 1, "aten.repeat_interleave.Tensor": 1}
    assert counter.total == 4
    only_tests = SyncCounter()
    with only_tests:
        t[mask], t.nonzero()
    assert only_tests.total == 1  # the tests' default set: nonzero, not the sized outputs


def test_copies_to_the_host_and_count_syncs():
    t = torch.arange(4)
    copies = TransferCounter()
    with copies:
        t.tolist(), t.cpu(), t.numpy(), t + 1
    assert copies.found == {"tolist": 1, "cpu": 1, "numpy": 1}
    assert count_syncs(lambda: (t.tolist(), int(t[0]), t.clone())) == 2
    assert count_syncs(lambda: (t.tolist(), int(t[0])), transfers=False) == 1


def test_sites_name_the_vtoken_code_that_waits():
    """``where=call_site`` keys each count by the innermost vtoken / transformers frames."""
    ops = SyncCounter(where=call_site)
    with ops:
        finish(torch.tensor([[5, 2, 7]]), [2], 0)  # reads whether any row ended (one .item())
    assert ops.total >= 1
    assert all(where.startswith("vtoken/engine/eos.py:") for (_, where) in ops.sites), ops.sites


def test_recording_merges_ops_and_copies_by_site():
    """``recording()`` lists both kinds of wait by (short op name, call site), as the profile prints them."""
    with recording() as sites:
        finish(torch.tensor([[5, 2, 7]]), [2], 0)
        torch.arange(3).tolist()  # made here (a test file): no vtoken / transformers frame
    assert sites[("tolist", "")] == 1
    assert sum(n for (what, where), n in sites.items() if where.startswith("vtoken/engine/eos.py:")) >= 1
    assert all("aten." not in what and ".default" not in what for what, _ in sites)
