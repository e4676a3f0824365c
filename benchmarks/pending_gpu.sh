#!/usr/bin/env bash
# The GPU measurements the open issues still lack (as of session 18), one device call per PART, each
# of at most ~580 s, outputs tarred (the device tool brings back at most 8 files):
#
#   OUT=dir PART=1 bash benchmarks/pending_gpu.sh
#
# PART=1 (issue 23; -> $OUT/pending.tgz)                                                       ~560 s
#   0. the GPU tests of what sessions 15-16 changed (session 18: test_engine_static.py passed; the other
#      files failed there from a test module that switched Triton's interpreter on, fixed since)
#   1. the Qwen2.5-VL-7B tower at 16K tokens: the tower's own rotary / norms / gate vs the fused kernels;
#      its full-attention call through every kernel there is (benchmarks/profile/long_attention.py)
#   2. the fused engine's batch-1 TTFT and batch-1 / 32 decode (benchmarks/e2e/profile_ttft.py):
#      in-graph greedy vs host token choice, merged vs separate q/k/v and gate/up GEMMs, in one run
# PART=2 (issue 21 item 5; -> $OUT/eval/*.tar.gz): finish the 1,000-question tiny-llava run of
#   session 15 (14 pairs left, ~150 s) beside tiny-qwen2vl and tiny-qwen2vl-video from scratch
#   (resumable: the tarballs are the next call's RESUME, e.g. RESUME=<this OUT>/eval PART=2b). Since
#   session 17 run_gpu.sh computes each batch's vision features once for the methods that leave the
#   tower alone (--reuse-vision on): on the CPU that made tiny-qwen2vl's evaluation 1.8x faster
# PART=2b: all three resumed from RESUME
# PART=4: PART=1's GPU tests beside the eval of tiny-qwen2vl and tiny-qwen2vl-video resumed from
#   benchmarks/eval/gpu-h100-s18 (EVAL_S s, default 300; tiny-llava is complete there), then, the GPU
#   to itself, PART=1's tower, long-attention and engine profiles (-> $OUT/pending.tgz, $OUT/eval/*.tar.gz)
# PART=5: PART=1's GPU tests (at most TESTS_S s, default 240) beside PART=2c's eval for the whole call, no
#   profiles (-> $OUT/gpu_tests.log, $OUT/eval/*.tar.gz)
# PART=6 (session 19; -> $OUT/p6.tgz, $OUT/eval/tiny-qwen2vl-video.tar.gz): the eval of the video checkpoint
#   resumed from gpu-h100-s19 (its gtc / dyvte weights are new) beside the GPU tests (the rotary tests' new
#   bound, long_segment_attention); then, the GPU to itself, the Qwen tower with and without cuDNN for its
#   full-attention blocks, the attention kernels at 65,536 / 16,384 / 4,096 / 64-patch segments, and
#   Qwen2.5-VL-7B's TTFT at one 4K / 16K-token image (transformers unpruned vs fastv keep 11 %); then PART=3's
#   users suite in what is left
# PART=2c: the eval alone, resumed from benchmarks/eval/gpu-h100-s18 (tiny-qwen2vl, tiny-qwen2vl-video)
# PART=3 (issue 23 item 5; -> $OUT/users): the users suite, LLaVA-1.5-7B and Qwen2.5-VL-7B, batch
#   1 / 8 / 32, 128 new tokens, transformers' static cache and apply_pruning(compile={"fused_ops": True}),
#   unpruned / fastv / divprune / visionzip (Qwen rows skip visionzip); TIME_BUDGET cuts what does not fit
#   (run again with --users-models qwen for the rest)
# PART=7 (session 20; -> $OUT/gpu_tests.log, prof.jsonl, prof.tgz, decode_kernels.jsonl, users_llava_dynamic/):
#   the GPU tests of gemv, the static engine and long_segment_attention; the engine profile with the batch-1
#   GEMV kernel and with cuBLAS (profile_ttft.py --variants merged,gemv); the decode kernels' sweep
#   (benchmarks/profile/decode_kernels.py: batch-1 GEMV tiles, gather_attend's splits and tiles); then the
#   users suite's LLaVA rows on the dynamic cache
# PART=8 (-> $OUT/users_llava_static/, users_qwen/): the users suite's LLaVA rows on transformers' static
#   cache (half of LIMIT), then Qwen's dynamic and static rows
# PART=10 (session 21, a short lease; -> $OUT/prof.jsonl, prof.tgz, gpu_tests.log, decode_kernels.jsonl): the engine
#   profile first (GEMV vs cuBLAS, TTFT with this session's host-wait removals, where the host still waits:
#   METHOD.syncs.txt), then the GPU tests of gemv and the engine, then the decode kernels' sweep in what is left
# PART=11 (the shortest lease; -> $OUT/prof.jsonl, prof.tgz): PART=10's engine profile alone, none and fastv
# PART=12 (session 22, issue 23 items 2-3; -> $OUT/gpu_tests.log, prof.jsonl, prof.tgz, decode_kernels.jsonl): the GPU
#   tests of the captured prefill head (tests/test_graph_emulator.py's gpu test), the engine and gemv; the engine
#   profile with the head captured (--variants merged,head,gemv: batch-1 TTFT, where the host still waits, decode
#   1 / 32); then the decode kernels' sweep in what is left
# PART=9 (-> $OUT/gpu_tests.log, prof.jsonl, prof.tgz, users_compile/): the GPU tests of the engine, gemv and
#   gather_attend; the engine profile (GEMV vs cuBLAS); the users suite's rows through
#   apply_pruning(compile={"fused_ops": True}), LLaVA then Qwen
set -u
OUT=${OUT:?set OUT=outdir}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PART=${PART:?set PART=1, 2, 2b, 2c, 3, 4, 5, 6, 7, 8, 9, 10, 11 or 12}
REPO=$(cd "$(dirname "$0")/.." && pwd); T0=$(date +%s)
left() { echo $(( ${LIMIT:-580} - ($(date +%s) - T0) )); }
. "$REPO/benchmarks/checkout_path.sh"  # vtoken from this checkout
W=$(mktemp -d)
eval_run() {  # eval_run RESUME_DIR CHECKPOINT...: run_gpu.sh within what is left (it tars after its own limit)
  local resume=$1; shift
  local budget=$(( $(left) - 40 ))
  [ "$budget" -gt 60 ] || { echo "== no time left for the eval"; return 0; }
  PYTHONPATH= OUT=$OUT/eval RESUME=$resume N=1000 SHARDS=14 BATCH=128 HARD_TIMEOUT=$budget \
    bash "$REPO/benchmarks/eval/run_gpu.sh" "$@" 2>&1 | grep -v "^|" | tail -6
}
gpu_tests() {  # the GPU tests of sessions 15-16's code, a failure's short traceback in the log
  TESTS="-rf --tb=short tests/test_engine_static.py tests/test_engine_merged_projections.py tests/test_generate_route.py
    tests/test_kernels_decode_ops.py tests/test_kernels_vision_rope.py tests/test_kernels_varlen.py
    tests/test_kernels_greedy_select.py tests/test_static_decode_stages.py" timeout "$1" bash "$REPO/benchmarks/gpu_tests.sh" "$REPO" > "$W/gpu_tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$W/gpu_tests.log" | tail -20
}
users_suite() {  # users_suite DIR MARGIN_BUDGET MARGIN_HARD: issue 23 item 5's suite within what is left
  (cd "$REPO" && OUT=$1 SUITES=users TIME_BUDGET=$(( $(left) - $2 )) HARD_TIMEOUT=$(( $(left) - $3 )) \
    bash benchmarks/e2e/run_gpu.sh --users-models "${USERS_MODELS:-llava,qwen}" --users-batch 1,8,32 \
    --users-caches "${USERS_CACHES:-static,compile-fused}" --users-methods unpruned,fastv,divprune,visionzip --users-new-tokens 128) 2>&1
}
tower_profiles() {  # the Qwen tower's variants, then its attention call through each kernel there is
    mkdir -p "$W/tower"; OUT=$W/tower timeout "$1" python "$REPO/benchmarks/profile/qwen_tower.py" 2>&1 | grep "^tower"
    timeout "$2" python "$REPO/benchmarks/profile/long_attention.py" > "$W/tower/long_attention.txt" 2>&1; cat "$W/tower/long_attention.txt"
}
profile() {  # the Qwen tower with / without the fused parts, then the engine profile, within what is left
    tower_profiles 120 90
    # (its rows are printed as they come and kept in prof.jsonl: a cut run keeps what it measured)
    mkdir -p "$W/prof"; timeout $(( $(left) - 20 )) python "$REPO/benchmarks/e2e/profile_ttft.py" --out "$W/prof" \
      --methods none,fastv,divprune --decode-batch 1,32 --merge on,off 2>&1 | grep '^{' | tee "$W/prof.jsonl"
    tar -czf "$OUT/pending.tgz" -C "$W" .
}
case "$PART" in
  1) gpu_tests 150; profile ;;
  4)
    LIMIT=$(( ${EVAL_S:-300} + 40 )) eval_run "$REPO/benchmarks/eval/gpu-h100-s18" tiny-qwen2vl tiny-qwen2vl-video &
    EP=$!; gpu_tests $(( ${EVAL_S:-300} - 20 )); wait $EP; profile ;;
  5)
    eval_run "$REPO/benchmarks/eval/gpu-h100-s18" tiny-qwen2vl tiny-qwen2vl-video &
    EP=$!; gpu_tests "${TESTS_S:-240}"; cp "$W/gpu_tests.log" "$OUT/"; wait $EP ;;
  6)
    LIMIT=200 eval_run "$REPO/benchmarks/eval/gpu-h100-s19" tiny-qwen2vl-video &
    EP=$!; gpu_tests 180; cp "$W/gpu_tests.log" "$OUT/"; wait $EP
    tower_profiles 150 100
    (cd "$REPO" && OUT=$W/qwen SUITES=qwen-long TIME_BUDGET=$(( $(left) - 40 )) HARD_TIMEOUT=$(( $(left) - 15 )) \
      bash benchmarks/e2e/run_gpu.sh --qwen-one-image --qwen-visual 4096,16384 --vision-paths sdpa) 2>&1 | tail -8
    # what is left: PART=3's users suite, LLaVA first (its TIME_BUDGET cuts what does not fit)
    [ "$(left)" -gt 120 ] && users_suite "$W/users" 70 25 | tail -12
    tar -czf "$OUT/p6.tgz" -C "$W" . ;;
  2) eval_run "$REPO/benchmarks/eval/gpu-h100-s15" tiny-llava tiny-qwen2vl tiny-qwen2vl-video ;;
  2c) eval_run "$REPO/benchmarks/eval/gpu-h100-s18" tiny-qwen2vl tiny-qwen2vl-video ;;
  2b) eval_run "${RESUME:?set RESUME to the OUT/eval of the previous PART=2 call}" tiny-llava tiny-qwen2vl tiny-qwen2vl-video ;;
  3) users_suite "$OUT/users" 90 30 | tail -30 ;;
  7)
    TESTS="-rf --tb=short tests/test_kernels_gemv.py tests/test_engine_static.py tests/test_kernels_varlen.py" timeout 120 \
      bash "$REPO/benchmarks/gpu_tests.sh" "$REPO" > "$OUT/gpu_tests.log" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log"
    mkdir -p "$W/prof"; timeout 200 python "$REPO/benchmarks/e2e/profile_ttft.py" --out "$W/prof" \
      --methods none,fastv,divprune --decode-batch 1,32 --variants merged,gemv 2>&1 | grep '^{' | tee "$OUT/prof.jsonl"
    tar -czf "$OUT/prof.tgz" -C "$W" prof
    timeout 120 python "$REPO/benchmarks/profile/decode_kernels.py" --quick --out "$OUT/decode_kernels.jsonl" | grep -E '"(best|default)"'
    USERS_MODELS=llava USERS_CACHES=dynamic users_suite "$OUT/users_llava_dynamic" 50 15 | tail -30 ;;
  12)
    TESTS="-rf --tb=short tests/test_graph_emulator.py tests/test_engine_static.py tests/test_kernels_gemv.py" timeout 120 \
      bash "$REPO/benchmarks/gpu_tests.sh" "$REPO" > "$OUT/gpu_tests.log" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log"
    mkdir -p "$W/prof"; timeout 270 python "$REPO/benchmarks/e2e/profile_ttft.py" --out "$W/prof" \
      --methods none,fastv,divprune --decode-batch 1,32 --variants merged,head,gemv 2>&1 | grep '^{' | tee "$OUT/prof.jsonl"
    tar -czf "$OUT/prof.tgz" -C "$W" prof
    timeout $(( $(left) - 10 )) python "$REPO/benchmarks/profile/decode_kernels.py" --quick --out "$OUT/decode_kernels.jsonl" \
      | grep -E '"(best|default)"' ;;
  9)
    TESTS="-rf --tb=short tests/test_engine_static.py tests/test_kernels_gemv.py tests/test_kernels_gather_attend.py" timeout 100 \
      bash "$REPO/benchmarks/gpu_tests.sh" "$REPO" > "$OUT/gpu_tests.log" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log"
    mkdir -p "$W/prof"; timeout 170 python "$REPO/benchmarks/e2e/profile_ttft.py" --out "$W/prof" \
      --methods none,fastv,divprune --decode-batch 1,32 --variants merged,gemv 2>&1 | grep '^{' | tee "$OUT/prof.jsonl"
    tar -czf "$OUT/prof.tgz" -C "$W" prof
    USERS_CACHES=compile-fused users_suite "$OUT/users_compile" 45 15 | tail -30 ;;
  10)
    mkdir -p "$W/prof"; timeout $(( $(left) - 200 )) python "$REPO/benchmarks/e2e/profile_ttft.py" --out "$W/prof" \
      --methods none,fastv,divprune --decode-batch 1,32 --variants merged,gemv 2>&1 | grep '^{' | tee "$OUT/prof.jsonl"
    tar -czf "$OUT/prof.tgz" -C "$W" prof
    TESTS="-rf --tb=short tests/test_kernels_gemv.py tests/test_engine_static.py" timeout 90 \
      bash "$REPO/benchmarks/gpu_tests.sh" "$REPO" > "$OUT/gpu_tests.log" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log"
    timeout $(( $(left) - 10 )) python "$REPO/benchmarks/profile/decode_kernels.py" --quick --out "$OUT/decode_kernels.jsonl" | grep -E '"(best|default)"' ;;
  11)
    mkdir -p "$W/prof"; timeout $(( $(left) - 15 )) python "$REPO/benchmarks/e2e/profile_ttft.py" --out "$W/prof" \
      --methods none,fastv --decode-batch 1,32 --variants merged,gemv 2>&1 | grep '^{' | tee "$OUT/prof.jsonl"
    tar -czf "$OUT/prof.tgz" -C "$W" prof ;;
  8)
    USERS_MODELS=llava USERS_CACHES=static users_suite "$OUT/users_llava_static" $(( ${LIMIT:-580} / 2 )) $(( ${LIMIT:-580} / 2 - 30 )) | tail -20
    USERS_MODELS=qwen USERS_CACHES=dynamic,static users_suite "$OUT/users_qwen" 50 15 | tail -20 ;;
  *) echo "PART must be 1, 2, 2b, 2c, 3, 4, 5, 6, 7, 8, 9, 10 or 11"; exit 2 ;;
esac
echo "== done after $(( $(date +%s) - T0 )) s"
