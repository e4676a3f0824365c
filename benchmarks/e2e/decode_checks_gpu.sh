#!/usr/bin/env bash
# Session 10's GPU checks of code written without a GPU, in one device call (about 5 minutes):
#   OUT=dir bash benchmarks/e2e/decode_checks_gpu.sh
# 1. the GPU-marked tests of StaticDecoder's decode-time stages, the low-bit gather_attend kernel,
#    compile=True's graph replay (tests/test_generate_route.py) and the static engine;
# 2. decode ms/token and KV bytes a step reads with decode-time stages on StaticDecoder (fused), then
#    the same plans through model.generate on the dynamic cache (LLaVA-1.5-7B shapes, random bf16).
# Files under $OUT: gpu_tests.txt, decode_static_fused.json, decode_generate.json, log.txt.
set -u
OUT=${OUT:?set OUT=outdir}; mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/../.." && pwd)
TESTS="tests/test_static_decode_stages.py tests/test_kernels_gather_attend_lowbit.py tests/test_generate_route.py tests/test_engine_static.py" \
  timeout -k 5 "${TEST_TIMEOUT:-150}" bash "$REPO/benchmarks/gpu_tests.sh" "$REPO" > "$OUT/gpu_tests.txt" 2>&1
echo "== gpu tests exit $?"; tail -15 "$OUT/gpu_tests.txt"
VT=$(mktemp -d); cp -r "$REPO/vtoken" "$VT/vtoken"
for d in kernels hooks scorers demos; do rm -rf "$VT/vtoken/$d"; ln -s "$REPO/$d" "$VT/vtoken/$d"; done
export PYTHONPATH="$VT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$VT" || exit 1
for engine in static-fused generate; do
  timeout -k 5 "${BENCH_TIMEOUT:-75}" python3 -m vtoken.bench.decode_kv --engine "$engine" --batch 1,32 --keep 64 \
    --methods a2sf,lookm,zipvl_kv --new-tokens 32 --repeats 3 --out "$OUT/decode_${engine/-/_}.json" >> "$OUT/log.txt" 2>&1
  echo "== decode_kv --engine $engine exit $?"
done
tail -30 "$OUT/log.txt"
