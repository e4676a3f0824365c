#!/usr/bin/env bash
# End-to-end GPU benchmark (issue 8), one command on one H100/H200:
#   OUT=dir bash benchmarks/e2e/run_gpu.sh [extra `vtoken bench` args]
# Runs the suites qwen-long, llava-next, peers and maxbatch in ONE process (each 7B architecture
# built once, directly on the GPU in bf16; LLaVA-1.5 shares LLaVA-NeXT-vicuna's modules).
# Soft time budget TIME_BUDGET (default 330 s): measurements that would start later are skipped and
# listed in the results; hard limit HARD_TIMEOUT (default 540 s). Results are rewritten after
# every row, so a killed run still leaves them. Files under $OUT: env.txt, log.txt, results.json,
# results.md. SUITES overrides the suite list (e.g. SUITES=all, SUITES=llava,qwen-lm).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/vtoken-e2e}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
# Import vtoken from this checkout without pip: vtoken/ plus the package-dir mapped folders, from a
# folder that does not put the repository's top-level kernels/ on sys.path.
REPO=$PWD; . benchmarks/checkout_path.sh
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  python3 -c "import torch, triton, transformers, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
cd "$VTOKEN_SHIM" || exit 1
T0=$(date +%s)
timeout -k 15 "${HARD_TIMEOUT:-540}" python3 -m vtoken.bench.cli --suite "${SUITES:-new}" --out "$OUT" \
  --repeats 3 --new-tokens 16 --time-budget "${TIME_BUDGET:-330}" "$@" > "$OUT/log.txt" 2>&1
rc=$?
echo "== vtoken bench exited $rc after $(( $(date +%s) - T0 )) s (log: $OUT/log.txt)"
grep -E "^(built |suite |SKIPPED|maxbatch probe)" "$OUT/log.txt"
if [ $rc -ne 0 ]; then echo "== last lines of the log"; grep -v "^{" "$OUT/log.txt" | tail -40; fi
if [ -f "$OUT/results.json" ]; then
  echo "== summary (from $OUT/results.json)"
  python3 -m vtoken.bench.cli --summary-from "$OUT/results.json"
fi
exit $rc
