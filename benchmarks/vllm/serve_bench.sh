#!/usr/bin/env bash
# Served throughput with vtoken's vLLM plugin: `vllm serve` on the built-in tiny Qwen2-VL, driven over
# the loopback by vLLM's own client (`vllm bench serve`, random-mm data set: one 448 x 448 image =
# 1024 visual tokens, 16 random text tokens, 16 output tokens, EOS ignored), unpruned vs DivPrune at
# 25 % and 11 %, at concurrency 1, 8 and 32. Run in the engine venv (build_env.sh):
#
#   source DIR/bin/activate && benchmarks/vllm/serve_bench.sh [RESULTS_DIR]
#
# Writes one JSON per (config, concurrency) from vLLM's client and results.md (the table).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-benchmarks/vllm/results}
MODEL=vtoken/zoo/checkpoints/tiny-qwen2vl
PORT=${PORT:-8047}
mkdir -p "$OUT"

serve_and_bench() {  # serve_and_bench LABEL METHOD KEEP
  local label=$1 method=$2 keep=$3 pid
  VTOKEN_METHOD=$method VTOKEN_KEEP=$keep vllm serve "$MODEL" --dtype float32 --enforce-eager \
    --max-model-len 2048 --gpu-memory-utilization 0.1 --port "$PORT" \
    --chat-template benchmarks/vllm/tiny_chat_template.jinja > "$OUT/serve_$label.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 120); do
    curl -sf "127.0.0.1:$PORT/v1/models" >/dev/null && break
    kill -0 "$pid" 2>/dev/null || { echo "vllm serve ($label) died; see $OUT/serve_$label.log" >&2; exit 1; }
    sleep 2
  done
  for conc in 1 8 32; do
    local n=$(( conc < 8 ? 16 : (conc == 8 ? 32 : 64) ))
    echo "== $label, concurrency $conc, $n requests"
    vllm bench serve --backend openai-chat --endpoint /v1/chat/completions --port "$PORT" --model "$MODEL" \
      --dataset-name random-mm --num-prompts "$n" --max-concurrency "$conc" --seed 0 \
      --random-input-len 16 --random-output-len 16 --random-range-ratio 0 \
      --random-mm-base-items-per-request 1 --random-mm-num-mm-items-range-ratio 0 \
      --random-mm-limit-mm-per-prompt '{"image": 1, "video": 0}' --random-mm-bucket-config '{(448, 448, 1): 1.0}' \
      --ignore-eos --percentile-metrics ttft,tpot,e2el --metric-percentiles 50,99 \
      --save-result --result-dir "$OUT" --result-filename "${label}_c${conc}.json" \
      --metadata "vtoken_method=$method" "vtoken_keep=$keep" > "$OUT/bench_${label}_c${conc}.log" 2>&1 \
      || { tail -20 "$OUT/bench_${label}_c${conc}.log"; kill "$pid"; exit 1; }
    grep -E "Request throughput|Median TTFT" "$OUT/bench_${label}_c${conc}.log"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

# unpruned: stock vLLM (VTOKEN_METHOD empty: the plugin registers nothing)
serve_and_bench unpruned "" ""
serve_and_bench divprune25 divprune 0.25
serve_and_bench divprune11 divprune 0.11
python benchmarks/vllm/bench_table.py "$OUT" > "$OUT/results.md"
cat "$OUT/results.md"
