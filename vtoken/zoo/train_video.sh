#!/usr/bin/env bash
# Train the video reference checkpoint vtoken/tiny-qwen2vl-video on one GPU: a tiny Qwen2-VL trained
# from scratch on vtoken.data.synthetic_video clips (half the batches) and the image recipe of
# train_both.sh (the other half), evaluated and packed into one tar file. This is the command its
# TRAINING.md records; it can run beside train_both.sh on the same GPU (tiny models leave it mostly
# idle).
#
#   OUT=outdir bash vtoken/zoo/train_video.sh [extra train.py args...]      (from the repo root)
#
# OUT receives: tiny-qwen2vl-video.tar (the checkpoint folder with metrics.json and TRAINING.md),
# qwen2vl-video.log and summary.txt. Unpack the tar into vtoken/zoo/checkpoints/ and
# `vtoken eval --data synthetic-video` picks it up.
# Time: BUDGET seconds of training (default 360); the whole command, evaluation included, ends
# within TOTAL seconds (default 470, under 8 minutes): train.py stops training early enough to keep
# its evaluation (--eval-reserve 100) before that deadline, and a hard `timeout` guards the rest.
# Other settings: CKPT_DIR (default /tmp/vtoken-ckpt), WORKERS (data workers, default 4),
# VIDEO_FRAC (share of video batches, default 0.5), INIT (continue from a checkpoint folder), PYTHON.
set -u
START=$(date +%s)
if [ -z "${OUT:-}" ]; then
    OUT=${1:?usage: OUT=outdir bash vtoken/zoo/train_video.sh [train.py args...]}
    shift
fi
BUDGET=${BUDGET:-360}
TOTAL=${TOTAL:-470}
CKPT_DIR=${CKPT_DIR:-/tmp/vtoken-ckpt}
WORKERS=${WORKERS:-4}
VIDEO_FRAC=${VIDEO_FRAC:-0.5}
mkdir -p "$OUT" "$CKPT_DIR"
OUT=$(cd "$OUT" && pwd)
rm -rf "$CKPT_DIR/tiny-qwen2vl-video"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export VTOKEN_TRAIN_COMMAND="OUT=<out> bash vtoken/zoo/train_video.sh${*:+ $*} (BUDGET=$BUDGET TOTAL=$TOTAL VIDEO_FRAC=$VIDEO_FRAC)"
# the vtoken-only folder to run from (REPO, SHIM, PY, PYTHONPATH; see train_env.sh)
source "$(dirname "$0")/train_env.sh"
DEADLINE=$((START + TOTAL))
LEFT=$((DEADLINE - $(date +%s) - 2))

timeout -k 3 "$LEFT" $PY -m vtoken.zoo.train --arch qwen2vl --data video --video-frac "$VIDEO_FRAC" \
    --out "$CKPT_DIR/tiny-qwen2vl-video" --tar "$OUT/tiny-qwen2vl-video.tar" \
    --time-budget "$BUDGET" --deadline "$DEADLINE" --eval-reserve 100 --workers "$WORKERS" --eval-workers 4 \
    --test-n 1000 --video-test-n 1000 ${INIT:+--init "$INIT"} "$@" >"$OUT/qwen2vl-video.log" 2>&1
R=$?

{
    echo "command: $VTOKEN_TRAIN_COMMAND"
    echo "started: $(date -u -d "@$START" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo "$START"); wall: $(( $(date +%s) - START )) s"
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "exit code: $R (124 = hard timeout)"
    m="$CKPT_DIR/tiny-qwen2vl-video/metrics.json"
    if [ -f "$m" ]; then
        $PY - "$m" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"steps {m['steps']} (best {m['best_step']}, val {m['best_val_acc']}), {m['train_time_s']} s, "
      f"eval {m.get('eval_time_s')} s, {m['checkpoint_bytes'] / 1e6:.1f} MB")
for key in ("synthetic", "synthetic_video"):
    ft, rk = m.get(f"{key}_unpruned_first_token", {}), m.get(f"{key}_random_keep", {})
    print(f"{key}: unpruned {ft.get('accuracy')}  random keep {rk.get('keep')}: {rk.get('accuracy')} "
          f"(drop {rk.get('drop_points')})")
    print(f"  per qtype: {ft.get('per_qtype')}")
print(f"targets: {m.get('targets')}")
PYEOF
    else
        echo "no metrics.json"
    fi
} >"$OUT/summary.txt" 2>&1
echo "===== qwen2vl-video"
grep -v "Warning\|it/s\]\|warnings.warn" "$OUT/qwen2vl-video.log" | grep -v '^ \|^{\|^}' | tail -n 30 | cut -c1-400
echo "===== summary"
cat "$OUT/summary.txt"
rm -rf "$SHIM"
[ "$R" = 0 ]
