"""vtoken.engine: decode paths beyond ``model.generate``.

- ``apply_pruning(model, ..., compile=True)``: the user's ``model.generate`` runs on the engine below
  (:mod:`~vtoken.engine.generate_route`: greedy, sampling, stopping criteria, streamer).
- :class:`StaticDecoder`: greedy decode over static, preallocated per-layer KV buffers read through
  kept-index lists by :func:`vtoken.kernels.gather_attend`, the step captured in a CUDA graph on
  CUDA (ragged kept counts across the batch, static shapes). Its pieces:
  :mod:`~vtoken.engine.static_decode` (the decoder, its decode step and ``generate``),
  :mod:`~vtoken.engine.static_kv` (:class:`StaticKV`, :class:`LayoutGroup`: buffers, kept-index
  lists), :mod:`~vtoken.engine.graphs` (CUDA-graph capture / replay), :mod:`~vtoken.engine.prefill`
  (the prefill and its captured tail), :mod:`~vtoken.engine.fused_decode` (opt-in fused layers).
"""

from vtoken.engine.static_decode import LayoutGroup, StaticDecoder, StaticKV

__all__ = ["LayoutGroup", "StaticDecoder", "StaticKV"]
