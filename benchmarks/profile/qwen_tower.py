"""Where Qwen2.5-VL-7B's vision tower spends its time at one 16K-token image (256 x 256 patches),
with the varlen attention ``apply_pruning`` installs: CUDA time per kernel family, and the
tower's compute floor (matmul FLOPs at the device's bf16 peak); the tower with transformers'
rotary embedding, norms and MLP and with the fused kernels and padded MLP GEMMs (patch_vision_varlen's
fused_ops), and with cuDNN's fused attention for the full-attention blocks, in the same run.

    OUT=dir python benchmarks/profile/qwen_tower.py   # CUDA; vtoken importable (see gpu_tests.sh)
"""
import os

import torch
from torch.profiler import ProfilerActivity, profile

from vtoken.bench import models as M
from vtoken.kernels import patch_vision_varlen

OUT = os.environ.get("OUT", "/tmp")
SIDE = int(os.environ.get("SIDE", "256"))  # patches per side
model = M.build_qwen25_vl(False, "cuda", torch.bfloat16)
visual = model.model.visual
grid = (1, SIDE, SIDE)
inputs = M.qwen_inputs(model, 1, grid, device="cuda", dtype=torch.bfloat16)
pix, thw = inputs["pixel_values"], inputs["image_grid_thw"]
vc = model.config.vision_config
P = SIDE * SIDE
lines = [f"{torch.cuda.get_device_name()}; torch {torch.__version__}; patches {P}; depth {vc.depth}; "
         f"hidden {vc.hidden_size}; heads {vc.num_heads}; head dim {vc.hidden_size // vc.num_heads}; "
         f"window {vc.window_size}px; full-attention blocks {vc.fullatt_block_indexes}"]


def timed(fn, n=3):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        ts.append(start.elapsed_time(end))
    return sorted(ts)[n // 2]


with torch.no_grad():
    run = lambda: visual(pix, grid_thw=thw)  # noqa: E731
    lines.append(f"tower, transformers SDPA: {timed(run):.1f} ms")
    remove = patch_vision_varlen(visual, fused_ops=False)
    lines.append(f"tower, varlen attention, the tower's own rotary, norms and MLP: {timed(run):.1f} ms")
    remove()
    remove = patch_vision_varlen(visual, long_segments_cudnn=False)  # session 16-18's tower
    lines.append(f"tower, varlen attention + fused rotary, norms, gate and padded MLP GEMMs: {timed(run):.1f} ms "
                 f"(checks passed: {sum(remove.fused_verdicts.values())} of {len(remove.fused_verdicts)})")
    remove()
    remove = patch_vision_varlen(visual)  # as apply_pruning installs it: the fused kernels where they agree
    lines.append(f"tower, as above with cuDNN attention for the full-attention blocks (segments >= 4,096 "
                 f"patches): {timed(run):.1f} ms")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    remove()
# FLOPs: per block qkv (3 D^2), proj (D^2), MLP (3 D I: gated), attention 4 P w D (window w patches)
D, I = vc.hidden_size, vc.intermediate_size
win = (vc.window_size // vc.patch_size) ** 2
full = len(vc.fullatt_block_indexes)
lin = vc.depth * 2 * P * (4 * D * D + 3 * D * I)
attn = 2 * 2 * P * D * ((vc.depth - full) * win + full * P)
merger = 2 * (P // 4) * ((4 * D) ** 2 + 4 * D * vc.out_hidden_size)
total = lin + attn + merger
lines.append(f"FLOPs: linear {lin / 1e12:.1f} T, attention {attn / 1e12:.1f} T, merger {merger / 1e12:.2f} T; "
             f"total {total / 1e12:.1f} T = {total / 790e12 * 1e3:.0f} ms at 790 TFLOP/s")
table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
lines.append(table)
text = "\n".join(lines)
print(text)
with open(os.path.join(OUT, "qwen_tower_profile.txt"), "w") as f:
    f.write(text + "\n")
