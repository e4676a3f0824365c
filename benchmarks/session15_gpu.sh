#!/usr/bin/env bash
# Session 15's first device call (<= 590 s): the batch-1 TTFT / batch-32 decode profile of the fused
# engine (issue 23), then issue 21 item 5's 1,000-question tiny-llava eval for the time left
# (resumable: RESUME=<this OUT> with the same N / SHARDS).
set -u
OUT=${OUT:?}; T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
timeout 260 python benchmarks/e2e/profile_ttft.py --out "$OUT/prof" --methods none,fastv,divprune --decode-batch 32 2>&1 | grep -v USDT | tail -8
tar -czf "$OUT/prof.tgz" -C "$OUT" prof && rm -rf "$OUT/prof"
LEFT=$(( ${LIMIT:-585} - ($(date +%s) - T0) - 25 ))
echo "== profile done after $(( $(date +%s) - T0 )) s; eval for $LEFT s"
[ "$LEFT" -gt 60 ] && OUT=$OUT/eval N=1000 SHARDS=${SHARDS:-14} BATCH=128 HARD_TIMEOUT=$LEFT bash benchmarks/eval/run_gpu.sh tiny-llava 2>&1 | grep -v "^|" | tail -15
