#!/usr/bin/env bash
# GPU tests + benchmarks for vtoken.kernels, as run on the lent H100 (one call).
# Usage (repo root): OUT=/some/dir bash benchmarks/kernels/run_gpu.sh [bench args...]
set -o pipefail
export PYTHONUNBUFFERED=1
# Keep the checkout root (whose bare vtoken/ lacks the mapped subpackages) off sys.path, in pytest-xdist workers too.
export PYTHONSAFEPATH=1
OUT=${OUT:-/tmp/vtoken-bench}; mkdir -p "$OUT"
# Import vtoken from this checkout without pip: vtoken/ plus the package-dir mapped folders.
VT=$(mktemp -d); cp -r vtoken "$VT/vtoken"
for d in kernels hooks scorers; do rm -rf "$VT/vtoken/$d"; ln -s "$PWD/$d" "$VT/vtoken/$d"; done
export PYTHONPATH="$VT${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
# Tests: fixed tiles (no autotune) to keep compiles short; 4 workers compile in parallel.
VTOKEN_KERNELS_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -m gpu -n 4 -p no:cacheprovider \
  tests/test_kernels_attend_and_score.py tests/test_kernels_gather_attend.py tests/test_kernels_varlen.py 2>&1 | tee "$OUT/tests.log" | tail -25
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/kernels/bench_kernels.py --json "$OUT/results.json" --md "$OUT/results.md" --profile-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^attend\|^gather\|^varlen\|^tower" | tail -80
