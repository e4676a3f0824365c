#!/usr/bin/env bash
# The GPU measurements the open issues still lack (as of session 14), in ONE device call of at most
# ~580 s, outputs in ONE file (the device tool brings back at most 8 files):
#
#   OUT=dir bash benchmarks/pending_gpu.sh        ->  $OUT/pending.tgz (+ the summaries on stdout)
#
# 1. `dyvte` re-measured after the one-sync stages (on_layout, session 14): LLaVA-1.5-7B shapes,
#    keep 64, batch 1 / 8 / 32, beside `gtc` and `fastv`                                    ~100 s
# 2. issue 23: the users suite on Qwen2.5-VL-7B at batch 1 (dynamic, static, compile-fused)  the rest
# Each part has its own time budget; a part cut by it lists what it skipped in its results.
# Issue 21 item 5 (the 1,000-question tables) is its own command, several calls long:
#   OUT=$OUT/eval N=1000 SHARDS=14 BATCH=128 HARD_TIMEOUT=540 bash benchmarks/eval/run_gpu.sh tiny-llava
#   (then RESUME=<previous OUT> in the next call; tar the outputs into one file)
set -u
OUT=${OUT:?set OUT=outdir}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d); T0=$(date +%s)
left() { echo $(( ${LIMIT:-580} - ($(date +%s) - T0) )); }
OUT=$W/learned SUITES=llava TIME_BUDGET=200 HARD_TIMEOUT=240 bash benchmarks/e2e/run_gpu.sh \
  --methods fastv,gtc,dyvte --keep 64 --batch 1,8,32 | tail -6
B=$(( $(left) - 30 ))
[ "$B" -gt 60 ] && OUT=$W/users SUITES=users TIME_BUDGET=$((B - 30)) HARD_TIMEOUT=$B bash benchmarks/e2e/run_gpu.sh \
  --users-models qwen --users-batch 1 --users-caches dynamic,static,compile-fused \
  --users-methods unpruned,fastv,divprune --users-new-tokens 33 | tail -6
tar -czf "$OUT/pending.tgz" -C "$W" .
echo "== pending.tgz after $(( $(date +%s) - T0 )) s"
