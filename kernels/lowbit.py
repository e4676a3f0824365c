"""Low-bit KV storage: per-token asymmetric min-max quantisation of key / value vectors and its
inverse (the mixed-precision KV of ZipVL's decode-time stage, ``DecodeStage(mode="quantize")``).
Pure PyTorch (here, not in ``vtoken.scorers``, because kernels import no other layer); both the
dynamic cache's low-bit store (:mod:`vtoken.hooks.decode_cache`) and the
dequantising read of :func:`vtoken.kernels.gather_attend_lowbit` use these two functions, so the
values either path attends to are the same.
"""

from __future__ import annotations

import torch


def quantize_tokens(x: torch.Tensor, bits: int) -> tuple:
    """Per-token asymmetric min-max quantisation over the last dim (each head's key or value vector
    of each token on its own grid): ``q = round((x - lo) / scale)``, ``scale = (hi - lo) / (2**bits - 1)``.

    x (..., L, D) float -> (packed (..., L, D * bits / 8) uint8, ``8 // bits`` codes a byte, the
    first in the lowest bits; scale (..., L, 1) and lo (..., L, 1) in x's dtype). D * bits must be
    a multiple of 8."""
    per = 8 // bits
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    scale = ((hi - lo).float() / (2 ** bits - 1)).to(x.dtype).float()  # the grid stored: codes on the same one
    codes = torch.where(scale > 0, ((x.float() - lo.float()) / scale.clamp_min(1e-30)).round(), torch.zeros_like(scale))
    codes = codes.clamp_(0, 2 ** bits - 1).to(torch.uint8)
    codes = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = (torch.arange(per, device=x.device, dtype=torch.uint8) * bits)
    packed = (codes << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bit fields: the sum is an OR
    return packed, scale.to(x.dtype), lo


def dequantize_tokens(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_tokens`: -> (..., L, D) in ``scale``'s dtype, ``lo + code * scale``."""
    per = 8 // bits
    shifts = (torch.arange(per, device=packed.device, dtype=torch.uint8) * bits)
    codes = (packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    codes = codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)
    return (lo.float() + codes.float() * scale.float()).to(scale.dtype)
