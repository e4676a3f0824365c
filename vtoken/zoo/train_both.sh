#!/usr/bin/env bash
# Train both reference checkpoints at once on one GPU (two processes: tiny models leave it mostly
# idle, so they share it well), evaluate them, and pack each into one tar file. This is the
# command each checkpoint's TRAINING.md records.
#
#   OUT=outdir bash vtoken/zoo/train_both.sh [extra train.py args...]      (from the repo root)
#
# OUT receives (flat, 5 files): tiny-llava.tar, tiny-qwen2vl.tar (each holds the checkpoint
# folder with metrics.json and TRAINING.md), llava.log, qwen2vl.log and summary.txt.
# Time: BUDGET seconds of training each (default 420), and the whole command, evaluation
# included, ends within TOTAL seconds (default 560): train.py stops training early enough to keep
# its evaluation before that deadline, skips the optional easy-VQA evaluation if time is short,
# and a hard `timeout` guards the rest (the tar is written as soon as the weights are saved).
# Other settings: CKPT_DIR (checkpoint folders, default /tmp/vtoken-ckpt), LLAVA_WORKERS /
# QWEN_WORKERS (data workers), LLAVA_INIT / QWEN_INIT (continue from checkpoint folders), PYTHON.
# easy-vqa: used if importable, or if the repository carries a copy of the package in
# .whl/site/easy_vqa (a git-ignored copy of the installed package: carry .whl to the GPU machine).
set -u
START=$(date +%s)
if [ -z "${OUT:-}" ]; then
    OUT=${1:?usage: OUT=outdir bash vtoken/zoo/train_both.sh [train.py args...]}
    shift
fi
BUDGET=${BUDGET:-420}
TOTAL=${TOTAL:-560}
CKPT_DIR=${CKPT_DIR:-/tmp/vtoken-ckpt}
LLAVA_WORKERS=${LLAVA_WORKERS:-4}
QWEN_WORKERS=${QWEN_WORKERS:-4}
mkdir -p "$OUT" "$CKPT_DIR"
OUT=$(cd "$OUT" && pwd)
rm -rf "$CKPT_DIR/tiny-llava" "$CKPT_DIR/tiny-qwen2vl"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export VTOKEN_TRAIN_COMMAND="OUT=<out> bash vtoken/zoo/train_both.sh${*:+ $*} (BUDGET=$BUDGET TOTAL=$TOTAL)"
# the vtoken-only folder to run from (REPO, SHIM, PY, PYTHONPATH; see train_env.sh)
source "$(dirname "$0")/train_env.sh"
DEADLINE=$((START + TOTAL))
LEFT=$((DEADLINE - $(date +%s) - 2))

timeout -k 3 "$LEFT" $PY -m vtoken.zoo.train --arch llava --out "$CKPT_DIR/tiny-llava" --tar "$OUT/tiny-llava.tar" \
    --time-budget "$BUDGET" --deadline "$DEADLINE" --eval-reserve 80 --workers "$LLAVA_WORKERS" --eval-workers 4 \
    ${LLAVA_INIT:+--init "$LLAVA_INIT"} "$@" >"$OUT/llava.log" 2>&1 &
P1=$!
timeout -k 3 "$LEFT" $PY -m vtoken.zoo.train --arch qwen2vl --out "$CKPT_DIR/tiny-qwen2vl" --tar "$OUT/tiny-qwen2vl.tar" \
    --time-budget "$BUDGET" --deadline "$DEADLINE" --eval-reserve 95 --workers "$QWEN_WORKERS" --eval-workers 5 \
    ${QWEN_INIT:+--init "$QWEN_INIT"} "$@" >"$OUT/qwen2vl.log" 2>&1 &
P2=$!
wait $P1; R1=$?
wait $P2; R2=$?

{
    echo "command: $VTOKEN_TRAIN_COMMAND"
    echo "started: $(date -u -d "@$START" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo "$START"); wall: $(( $(date +%s) - START )) s"
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "exit codes: llava=$R1 qwen2vl=$R2 (124 = hard timeout)"
    for f in tiny-llava tiny-qwen2vl; do
        m="$CKPT_DIR/$f/metrics.json"
        [ -f "$m" ] || { echo "$f: no metrics.json"; continue; }
        $PY - "$m" "$f" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
ft, rk = m.get("synthetic_unpruned_first_token", {}), m.get("synthetic_random_keep", {})
ev = m.get("easy_vqa_test", {})
print(f"{sys.argv[2]}: steps {m['steps']} (best {m['best_step']}, val {m['best_val_acc']}), "
      f"{m['train_time_s']} s, eval {m.get('eval_time_s')} s, {m['checkpoint_bytes'] / 1e6:.1f} MB, packed={m['recipe']['packed_turns']}")
print(f"  unpruned {ft.get('accuracy')}  random keep {rk.get('keep')}: {rk.get('accuracy')} (drop {rk.get('drop_points')})"
      f"  easy-vqa {ev.get('accuracy', ev.get('error'))}  subset {m.get('cpu_test_subset', {}).get('accuracy_device')}")
print(f"  per qtype: {ft.get('per_qtype')}")
print(f"  targets: {m.get('targets')}")
EOF
    done
} >"$OUT/summary.txt" 2>&1
for f in llava qwen2vl; do
    echo "===== $f"
    grep -v "Warning\|it/s\]\|warnings.warn" "$OUT/$f.log" | grep -v '^ \|^{\|^}' | tail -n 30 | cut -c1-400
done
echo "===== summary"
cat "$OUT/summary.txt"
rm -rf "$SHIM"
[ "$R1" = 0 ] && [ "$R2" = 0 ]
