"""Host time of the static engine's per-call attention swap at LLaVA-1.5-7B's size (32 attention
modules sharing the text config), before and after session 20's cache (``vtoken.engine.attention_swap``):
a private shallow config copy per module per call, against copies kept per (module, config state).

    python benchmarks/profile/attention_swap_cpu.py

Prints the median and min of 200 swap + restore rounds each way (interleaved), in microseconds.
"""

import statistics
import time

import torch
import transformers
from transformers import LlamaConfig

from vtoken.engine.attention_swap import AttentionSwap
from vtoken.engine.static_decode import STATIC_IMPL
from vtoken.hooks import private_attention_config


def main():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32064)
    modules = []
    for _ in range(32):
        m = torch.nn.Module()
        m.config = cfg
        modules.append(m)
    kept = AttentionSwap(STATIC_IMPL, _vtoken_static=None)

    def per_call():  # the engine before: a copy per module per call
        undo = []
        for m in modules:
            undo.append((m, m.config))
            m.config = private_attention_config(m.config, STATIC_IMPL, _vtoken_static=None)
        for m, original in undo:
            m.config = original

    def cached():
        AttentionSwap.restore(kept.swap(modules))

    times = {"copy per call": [], "kept copies": []}
    for _ in range(200):
        for name, fn in (("copy per call", per_call), ("kept copies", cached)):
            t0 = time.perf_counter()
            fn()
            times[name].append(1e6 * (time.perf_counter() - t0))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; 32 modules, LLaVA-1.5-7B's text config")
    for name, ts in times.items():
        print(f"{name:14s} median {statistics.median(ts):8.1f} us   min {min(ts):8.1f} us")


if __name__ == "__main__":
    main()
