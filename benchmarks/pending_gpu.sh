#!/usr/bin/env bash
# The GPU measurements the open issues still lack (as of session 16), in ONE device call of at most
# ~580 s, outputs tarred (the device tool brings back at most 8 files):
#
#   OUT=dir bash benchmarks/pending_gpu.sh        ->  $OUT/pending.tgz, $OUT/eval/tiny-llava.tar.gz (+ summaries)
#
# 1. issue 23: the fused engine's batch-1 TTFT and batch-1 / 32 decode after sessions 15-16's changes
#    (in-graph greedy, fused prefill tail, DivPrune's one-launch picks, the kept session for shorter
#    calls, merged q/k/v and gate/up GEMMs), graph vs host token choice, merged vs separate
#    projections, all in one run (benchmarks/e2e/profile_ttft.py)                          ~300 s
# 2. issue 21 item 5: finish the 1,000-question tiny-llava run of session 15 (14 pairs left)  the rest
#    (step 0 and 1 take most of one call: expect the eval in a second call)
# Then, in later calls: the same for tiny-qwen2vl and tiny-qwen2vl-video (N=1000 SHARDS=14 BATCH=128,
# RESUME=<previous OUT> when a call cuts them), and the users suite on Qwen2.5-VL-7B.
set -u
OUT=${OUT:?set OUT=outdir}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd); T0=$(date +%s)
left() { echo $(( ${LIMIT:-580} - ($(date +%s) - T0) )); }
. "$REPO/benchmarks/checkout_path.sh"  # vtoken from this checkout
W=$(mktemp -d)
# 0. the GPU tests of what sessions 15-16 changed (none of session 16's code has run on a GPU)  ~90 s
TESTS="tests/test_engine_static.py tests/test_engine_merged_projections.py tests/test_generate_route.py
  tests/test_kernels_decode_ops.py tests/test_kernels_vision_rope.py tests/test_kernels_varlen.py
  tests/test_kernels_greedy_select.py" timeout 150 bash "$REPO/benchmarks/gpu_tests.sh" "$REPO" > "$W/gpu_tests.log" 2>&1
tail -3 "$W/gpu_tests.log"
# 0b. the Qwen2.5-VL-7B tower at 16K tokens: transformers' rotary vs the fused one (issue 23 item 4)  ~60 s
mkdir -p "$W/tower"; OUT=$W/tower timeout 120 python "$REPO/benchmarks/profile/qwen_tower.py" 2>&1 | grep "^tower"
# (its rows are printed as they come and kept in prof.jsonl: a cut run keeps what it measured)
mkdir -p "$W/prof"; timeout $(( $(left) - 30 )) python "$REPO/benchmarks/e2e/profile_ttft.py" --out "$W/prof" \
  --methods none,fastv,divprune --decode-batch 1,32 --merge on,off 2>&1 | grep '^{' | tee "$W/prof.jsonl"
tar -czf "$OUT/pending.tgz" -C "$W" .
B=$(( $(left) - 40 ))  # run_gpu.sh tars its run folder after its own limit: leave it the time
[ "$B" -gt 60 ] && PYTHONPATH= OUT=$OUT/eval RESUME=$REPO/benchmarks/eval/gpu-h100-s15 N=1000 SHARDS=14 BATCH=128 \
  HARD_TIMEOUT=$B bash "$REPO/benchmarks/eval/run_gpu.sh" tiny-llava 2>&1 | grep -v "^|" | tail -4
echo "== done after $(( $(date +%s) - T0 )) s"
