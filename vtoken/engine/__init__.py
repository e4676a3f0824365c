"""vtoken.engine: decode paths beyond ``model.generate``.

- :class:`StaticDecoder`: greedy decode over static, preallocated per-layer KV buffers read through
  kept-index lists by :func:`vtoken.kernels.gather_attend`, the step captured in a CUDA graph on
  CUDA (ragged kept counts across the batch, static shapes).
"""

from vtoken.engine.static_decode import StaticDecoder, StaticKV

__all__ = ["StaticDecoder", "StaticKV"]
