#!/usr/bin/env bash
# The GPU measurements the open issues still lack (as of session 13), in ONE device call of at most
# ~580 s, outputs in ONE file (the device tool brings back at most 8 files):
#
#   OUT=dir bash benchmarks/pending_gpu.sh        ->  $OUT/pending.tgz (+ the summaries on stdout)
#
# 1. issue 24: `gtc` / `dyvte` in the bench (LLaVA-1.5-7B shapes, keep 64, batch 1 / 8 / 32; the
#    networks of the model's shapes from vtoken/bench/learned_weights.py)           ~100 s
# 2. issue 24: decode-time stages after lazyllm's candidate buffers (KV bytes, ms/token, batch 1 / 32)  ~90 s
# 3. issue 20: `flashvid` and `divprune` on video at batch 32 (Qwen2.5-VL-7B, 2,048 visual tokens)     ~200 s
# 4. issue 23: the users suite on Qwen2.5-VL-7B at batch 1 (dynamic, static, compile-fused)  the rest
# Each part has its own time budget; a part cut by it lists what it skipped in its results.
# SKIP_USERS=1 leaves part 4 out (the call then ends after part 3, ~400 s).
set -u
OUT=${OUT:?set OUT=outdir}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d); T0=$(date +%s)
left() { echo $(( ${LIMIT:-580} - ($(date +%s) - T0) )); }
OUT=$W/learned SUITES=llava TIME_BUDGET=80 HARD_TIMEOUT=110 bash benchmarks/e2e/run_gpu.sh \
  --methods gtc,dyvte --keep 64 --batch 1,8,32 | tail -6
VT=$(mktemp -d); cp -r vtoken "$VT/vtoken"
for d in kernels hooks scorers demos; do rm -rf "$VT/vtoken/$d"; ln -s "$PWD/$d" "$VT/vtoken/$d"; done
mkdir -p "$W/decode_kv"
(cd "$VT" && PYTHONPATH=$VT timeout -k 5 100 python3 -m vtoken.bench.decode_kv --batch 1,32 --keep 64 \
  --new-tokens 16 --repeats 3 --methods lazyllm,a2sf,fastv --out "$W/decode_kv/decode_kv.json" > "$W/decode_kv/log.txt" 2>&1)
tail -12 "$W/decode_kv/log.txt"
B=$(( $(left) - 150 )); [ "$B" -gt 230 ] && B=230
OUT=$W/video SUITES=video TIME_BUDGET=$B HARD_TIMEOUT=$((B + 40)) bash benchmarks/e2e/run_gpu.sh \
  --video-batch 32 --video-methods flashvid,divprune | tail -4
B=$(( $(left) - 30 ))
[ -z "${SKIP_USERS:-}" ] && [ "$B" -gt 60 ] && OUT=$W/users SUITES=users TIME_BUDGET=$((B - 30)) HARD_TIMEOUT=$B bash benchmarks/e2e/run_gpu.sh \
  --users-models qwen --users-batch 1 --users-caches dynamic,static,compile-fused \
  --users-methods unpruned,fastv,divprune --users-new-tokens 33 | tail -6
tar -czf "$OUT/pending.tgz" -C "$W" .
echo "== pending.tgz after $(( $(date +%s) - T0 )) s"
