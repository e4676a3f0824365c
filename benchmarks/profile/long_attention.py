"""What bounds Qwen2.5-VL-7B's vision tower after session 16: its attention (issue 23 item 4).

Session 18 measured the tower at 487.7 ms for one 65,536-patch image (2.24x its 218 ms compute
floor), 314 ms of it in vtoken's varlen kernel, almost all in the four full-attention blocks (one
segment of 65,536 patches, 16 heads of dim 80: 22 TFLOP a block, ~282 TFLOP/s). This script times
that one attention call, and the 64-patch windows of the other 28 blocks, through each kernel there
is, in one run, with the output of each checked against the first:

- ``varlen``: ``vtoken.kernels.varlen_attention`` (Triton; head dim 80 as a 64- and a 16-wide slice);
- ``sdpa-flash`` / ``sdpa-cudnn`` / ``sdpa-efficient``: PyTorch's fused attention, one backend at a
  time (``torch.nn.attention.sdpa_kernel``), the segment as one ``[1, H, P, D]`` call, equal windows
  as a batch of ``[P / w, H, w, D]`` (a square image's windows are all the same length).

    python benchmarks/profile/long_attention.py            # CUDA, bf16, P = 65,536
    python benchmarks/profile/long_attention.py --tiny     # CPU, float32, P = 256: checks the script

Prints one line per (shape, kernel): median ms of 5 after 2 warm-ups, TFLOP/s (4 P w H D FLOPs for
windows of w patches), the largest difference from the first kernel's output, or why it cannot run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vtoken.kernels import varlen_attention


def _median_ms(fn, cuda: bool, n: int = 5) -> float:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(n):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            ts.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ts)


def kernels(q, k, v, window: int):
    """(name, fn) of each kernel computing block-diagonal attention over windows of ``window``
    patches of ``q, k, v`` ``[P, H, D]``; each fn returns ``[P, H, D]``."""
    P, H, D = q.shape
    cu = torch.arange(0, P + 1, window, dtype=torch.int32, device=q.device)
    yield "varlen", lambda: varlen_attention(q, k, v, cu, max_seqlen=window)

    def windows(x):  # [P, H, D] -> [P / w, H, w, D]
        return x.view(P // window, window, H, D).transpose(1, 2)

    qw, kw, vw = windows(q), windows(k), windows(v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION), ("sdpa-math", SDPBackend.MATH)):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qw, kw, vw).transpose(1, 2).reshape(P, H, D)
        yield name, run


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, float32, 256 patches (checks the script)")
    ap.add_argument("--patches", type=int, default=None)
    args = ap.parse_args(argv)
    cuda = not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    P = args.patches or (65536 if cuda else 256)
    H, D = 16, 80
    torch.manual_seed(0)
    q, k, v = (torch.randn(P, H, D, device=device, dtype=dtype) for _ in range(3))
    # windows of 16,384 and 4,096 patches: the full-attention blocks of smaller images (as P / w images
    # of one batch), where vtoken.kernels.varlen.LONG_SEGMENT puts the switch to cuDNN
    rows = []
    for window in (P, 64) if args.tiny or args.patches else (P, 16384, 4096, 64):
        ref = None
        for name, fn in kernels(q, k, v, window):
            if name == "sdpa-math" and window >= 4096 and cuda:
                continue  # materialises the P x P scores: 128 GiB at 65,536 patches
            try:
                out = fn()
                ms = _median_ms(fn, cuda)
            except Exception as exc:  # noqa: BLE001 - a backend that does not take this shape or dtype
                rows.append({"window": window, "kernel": name, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
                print(f"window {window:>6}  {name:<15} cannot run: {rows[-1]['error']}", flush=True)
                continue
            diff = 0.0 if ref is None else float((out.float() - ref.float()).abs().max())
            ref = out if ref is None else ref
            tflops = 4 * P * window * H * D / (ms * 1e-3) / 1e12
            rows.append({"window": window, "kernel": name, "ms": ms, "tflops": tflops, "max_diff": diff})
            print(f"window {window:>6}  {name:<15} {ms:9.2f} ms  {tflops:6.1f} TFLOP/s  max |diff| {diff:.3g}",
                  flush=True)
    return rows


if __name__ == "__main__":
    if torch.cuda.is_available():
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    main()
