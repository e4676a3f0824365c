"""How far two correct rotary embeddings may differ after rounding (the GPU tests of the kernels).

``out = x * cos + rotate_half(x) * sin``. A reference and a kernel that both compute it correctly
can still differ: each rounds the two products and their sum in its own way (transformers' Llama
rotary multiplies in the tensors' dtype, its Qwen vision rotary in float32; a compiled Triton kernel
computes in float32 and may fuse a multiply and an add, rounding once where the reference rounds
twice). Where the two products nearly cancel, the result is small and those roundings, relative to
the products, are large relative to it: a bound relative to the result alone fails there on a
correct kernel (it did on the H100 in session 19), while a wrong formula (a sign, a swapped half, the
wrong position's angles) misses by the size of the products. The bound per element:

    |got - want| <= 2 * eps(products) * (|x * cos| + |rotate_half(x) * sin|) + eps(out) * max(|got|, |want|)

(each product and the sum rounded at most once more on either side, then one rounding to the output
dtype).
"""

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def within_rotary_rounding(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, product_dtype: torch.dtype) -> torch.Tensor:
    """Per element: whether ``got`` and ``want`` (one dtype), two roundings of
    ``x * cos + rotate_half(x) * sin`` (``cos`` / ``sin`` broadcastable to ``x``), are within the bound
    above; ``product_dtype`` is the dtype the less precise of the two multiplies in."""
    out_eps = torch.finfo(want.dtype).eps
    x, cos, sin = x.float(), cos.float(), sin.float()
    magnitude = (x * cos).abs() + (rotate_half(x) * sin).abs()
    got, want = got.float(), want.float()
    bound = 2 * torch.finfo(product_dtype).eps * magnitude + out_eps * torch.maximum(got.abs(), want.abs())
    return (got - want).abs() <= bound
