"""MergedLinear (vtoken.kernels.merged_linear): linears reading one input as one GEMM over a
zero-padded buffer that the model's own parameters become views of.

Independent expectations: each ``nn.Linear`` on its own (before the merge, and the same module
after it, reading its view), the zero padding (exact zeros out, nothing added in), the parameters'
storage (views while merged, their own contiguous storage after ``release``).
"""

import torch
from torch import nn

from vtoken.kernels.merged_linear import MergedLinear, mergeable


def _linears(outs, k, bias, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(k, n, bias=bias) for n in outs]


def _owns(t):
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_padded_outputs_are_the_linears_with_zero_columns():
    lins = _linears([13, 7], 20, bias=True)
    x = torch.randn(3, 4, 20)
    want = [lin(x) for lin in lins]
    weights = [lin.weight.detach().clone() for lin in lins]
    merged = MergedLinear(lins, pad_out=8)
    assert merged.padded == [16, 8] and merged.weight.shape == (24, 20)
    for got, w, n in zip(merged(x), want, [13, 7]):
        torch.testing.assert_close(got[..., :n], w, rtol=1e-6, atol=1e-6)
        assert torch.equal(got[..., n:], torch.zeros_like(got[..., n:]))  # zero weights, zero bias
    for lin, w, old in zip(lins, want, weights):
        assert not _owns(lin.weight) and torch.equal(lin.weight, old)  # a view, the same values
        torch.testing.assert_close(lin(x), w, rtol=1e-6, atol=1e-6)  # the module itself reads its view
    assert merged.intact()
    merged.release()
    assert all(_owns(lin.weight) and _owns(lin.bias) for lin in lins)
    assert all(torch.equal(lin.weight, old) for lin, old in zip(lins, weights))


def test_padded_input_width_adds_nothing_and_the_module_reads_a_strided_view():
    (down,) = _linears([6], 11, bias=True, seed=1)
    x = torch.randn(5, 11)
    want = down(x)
    merged = MergedLinear([down], pad_in=8)
    assert merged.in_features == 16 and not down.weight.is_contiguous()
    x_padded = torch.cat([x, torch.randn(5, 5) * 0], dim=-1)
    torch.testing.assert_close(merged(x_padded)[0], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(down(x), want, rtol=1e-6, atol=1e-6)
    sd = down.state_dict()["weight"]
    assert sd.shape == (6, 11)
    merged.release()
    assert _owns(down.weight)


def test_reassigned_or_shared_weights():
    lins = _linears([4, 4], 8, bias=False, seed=2)
    merged = MergedLinear(lins)
    lins[1].weight = nn.Parameter(torch.randn(4, 8))
    assert not merged.intact()
    merged.release()
    assert _owns(lins[0].weight)
    shared = _linears([4, 4], 8, bias=False, seed=3)
    shared[1].weight = nn.Parameter(shared[0].weight.detach()[:2])  # a view of another weight
    assert not mergeable(shared)
    mixed = _linears([4], 8, bias=True) + _linears([4], 8, bias=False)
    assert not mergeable(mixed)  # a bias on some parts only
