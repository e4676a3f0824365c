"""vtoken.kernels (installed from the repository folder ``kernels/``): Triton kernels with a PyTorch
reference beside each (docs/DESIGN.md section 5). Imports only torch, triton and other vtoken.kernels
modules; ``import kernels`` never runs this folder (``vtoken/_folder_guard.py``).

- :func:`attend_and_score`: causal FlashAttention forward (GQA, padding) that also returns the exact,
  head-averaged (or per-head) attention probabilities of chosen query rows over a key range, from the
  forward's log-sum-exp; never materialises N x N. For scoring layers of attention-based pruning.
- :func:`gather_attend`: split-K attention of a few queries over kept entries of a static KV buffer
  read through index lists (ragged kept counts, static shapes, CUDA-graph safe). For pruned decode;
  ``return_row=True`` also gives the last query's attention row (for scores accumulated over steps).
  :func:`gather_attend_lowbit` adds low-bit entries read through a dequantising path (mixed-precision
  KV, :mod:`vtoken.kernels.lowbit`'s grid).
- :func:`varlen_attention`: block-diagonal attention over packed segments in one launch, and
  :func:`patch_vision_varlen` to route a Qwen2/2.5-VL vision tower's windowed attention through it
  (with the tower's rotary embedding as one launch, :func:`vtoken.kernels.vision_rope.rope_vision`).

Each has a PyTorch reference (``*_reference``: the same function with ``backend="torch"``, its
implementation in :mod:`vtoken.kernels.reference`); ``backend="auto"`` picks Triton for CUDA tensors
when triton imports, the reference otherwise; ``"triton"`` / ``"torch"`` force one. Arguments are
checked in :mod:`vtoken.kernels.checks`; the Triton kernels share their online-softmax device
functions through :mod:`vtoken.kernels.triton_helpers`.
"""

if "." not in __name__:  # imported under its bare folder name: the name goes to its real owner
    import pathlib, runpy
    runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "vtoken" / "_folder_guard.py"))["hand_over"](__name__, __file__)
else:
    from vtoken.kernels.attend_and_score import attend_and_score, attend_and_score_reference
    from vtoken.kernels.dispatch import HAS_TRITON, resolve_backend
    from vtoken.kernels.gather_attend import gather_attend, gather_attend_reference
    from vtoken.kernels.gather_attend_lowbit import LowBitEntries, gather_attend_lowbit, gather_attend_lowbit_reference
    from vtoken.kernels.varlen import varlen_attention, varlen_attention_reference
    from vtoken.kernels.vision_patch import patch_vision_varlen

    __all__ = [
        "HAS_TRITON",
        "attend_and_score",
        "attend_and_score_reference",
        "gather_attend",
        "gather_attend_reference",
        "gather_attend_lowbit",
        "gather_attend_lowbit_reference",
        "LowBitEntries",
        "patch_vision_varlen",
        "resolve_backend",
        "varlen_attention",
        "varlen_attention_reference",
    ]
