#!/usr/bin/env bash
# Train both reference checkpoints at once on one GPU (tiny models leave it mostly idle, so two
# runs share it well) and pack each into a tar file. This is the command TRAINING.md records.
#
#   bash vtoken/zoo/train_both.sh OUTDIR [SECONDS_OF_TRAINING] [extra train.py args...]
#
# Checkpoint folders go to $CKPT_DIR (default /tmp/vtoken-ckpt); OUTDIR receives
# tiny-llava.tar, tiny-qwen2vl.tar, llava.log and qwen2vl.log. LLAVA_INIT / QWEN_INIT (checkpoint
# folders) continue training from saved weights instead of random ones.
set -u
OUTDIR=${1:?usage: train_both.sh OUTDIR [SECONDS] [train.py args...]}
BUDGET=${2:-330}
shift 2 || shift $#
CKPT_DIR=${CKPT_DIR:-/tmp/vtoken-ckpt}
LLAVA_WORKERS=${LLAVA_WORKERS:-6}
QWEN_WORKERS=${QWEN_WORKERS:-8}
mkdir -p "$OUTDIR" "$CKPT_DIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONUNBUFFERED=1
# Run from a folder that holds only the vtoken package (with scorers/, hooks/, kernels/ linked in
# as vtoken.scorers etc., as the installed package maps them): from the repository root, the
# top-level kernels/ folder would shadow the PyPI package `kernels` that transformers probes.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SHIM=$(mktemp -d)
mkdir "$SHIM/vtoken"
for f in "$REPO"/vtoken/*; do ln -s "$f" "$SHIM/vtoken/$(basename "$f")"; done
for d in scorers hooks kernels; do [ -d "$REPO/$d" ] && ln -sfn "$REPO/$d" "$SHIM/vtoken/$d"; done
cd "$SHIM"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

$PY -m vtoken.zoo.train --arch llava --out "$CKPT_DIR/tiny-llava" --tar "$OUTDIR/tiny-llava.tar" \
    --time-budget "$BUDGET" --workers "$LLAVA_WORKERS" ${LLAVA_INIT:+--init "$LLAVA_INIT"} "$@" >"$OUTDIR/llava.log" 2>&1 &
P1=$!
$PY -m vtoken.zoo.train --arch qwen2vl --out "$CKPT_DIR/tiny-qwen2vl" --tar "$OUTDIR/tiny-qwen2vl.tar" \
    --time-budget "$BUDGET" --workers "$QWEN_WORKERS" ${QWEN_INIT:+--init "$QWEN_INIT"} "$@" >"$OUTDIR/qwen2vl.log" 2>&1 &
P2=$!
wait $P1; R1=$?
wait $P2; R2=$?
for f in llava qwen2vl; do
    echo "===== $f"
    grep -v "Warning\|it/s\]" "$OUTDIR/$f.log" | tail -n 60
done
echo "exit codes: llava=$R1 qwen2vl=$R2"
[ "$R1" = 0 ] && [ "$R2" = 0 ]
