"""Host time of a batch-1 ``generate(max_new_tokens=1)`` with a handle attached, with and without
vtoken's once-per-state answer to transformers' legacy-generation-parameters check
(``hooks/generation_check.py``, installed as ``vtoken.hooks.generation_check``), in one run, interleaved.

    python benchmarks/profile/generation_check_cpu.py      # tiny LLaVA of the tests, on the CPU

Prints, per route (plain ``generate``, ``compile=True``), the median and min of 30 calls each way.
"""

import os
import statistics
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from conftest import SUPPRESS, get_inputs, get_model  # noqa: E402

import vtoken  # noqa: E402
from vtoken.hooks import generation_check  # noqa: E402

generation_check.SLOW_CHECK_S = 0.0  # the answer cached whatever the check costs (5.25's too) ...


def _set_cached(config, on: bool) -> None:
    """... unless the config's class counts as one whose check is cheap: then transformers' own
    check runs on every call (the module's switch, read on each call)."""
    (generation_check._FAST_CLASSES.discard if on else generation_check._FAST_CLASSES.add)(type(config))


def main():
    torch.set_num_threads(1)
    model = get_model("llava")
    inputs = get_inputs("llava", model, variant="single")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, tiny LLaVA, fastv keep 4, batch 1")
    for compile in (False, True):
        times = {True: [], False: []}
        with vtoken.apply_pruning(model, method="fastv", keep=4, compile=compile):
            for i in range(66):
                on = bool(i % 2)
                _set_cached(model.config, on)
                t = time.perf_counter()
                model.generate(**inputs, max_new_tokens=1, do_sample=False, suppress_tokens=SUPPRESS)
                if i >= 6:  # warm-up calls
                    times[on].append(1e3 * (time.perf_counter() - t))
        _set_cached(model.config, True)
        row = ", ".join(f"{'answered once per state' if on else 'checked every call'}: median {statistics.median(ts):.2f} ms "
                        f"(min {min(ts):.2f})" for on, ts in sorted(times.items()))
        print(f"compile={compile}: {row}")


if __name__ == "__main__":
    main()
