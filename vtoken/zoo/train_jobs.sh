#!/usr/bin/env bash
# Train several tiny checkpoints at once on one GPU (tiny models leave it mostly idle, so parallel
# processes share it well), evaluate each, and pack each into one tar file.
#
#   OUT=outdir bash vtoken/zoo/train_jobs.sh 'NAME ARCH [train.py args...]' ['NAME ARCH ...' ...]
#
# Each job runs `python -m vtoken.zoo.train --arch ARCH --out $CKPT_DIR/NAME --tar $OUT/NAME.tar
# [args]`, logging to $OUT/NAME.log; $OUT/summary.txt gets each job's metrics. Training lasts
# BUDGET seconds per job (default 420) and the whole command, evaluation included, ends within
# TOTAL seconds (default 560): train.py stops early enough to keep its evaluation before that
# deadline and a hard `timeout` guards the rest. WORKERS: data workers per job (default
# 12 / number of jobs, at least 2). CKPT_DIR (default /tmp/vtoken-ckpt), PYTHON. easy-vqa and the
# folder the jobs run from: train_env.sh (carry .whl to the GPU machine).
set -u
START=$(date +%s)
OUT=${OUT:?set OUT=outdir}
[ $# -ge 1 ] || { echo "usage: OUT=dir bash $0 'NAME ARCH [args...]' ..." >&2; exit 2; }
BUDGET=${BUDGET:-420}
TOTAL=${TOTAL:-560}
CKPT_DIR=${CKPT_DIR:-/tmp/vtoken-ckpt}
NJOBS=$#
WORKERS=${WORKERS:-$(( 12 / NJOBS > 2 ? 12 / NJOBS : 2 ))}
mkdir -p "$OUT" "$CKPT_DIR"
OUT=$(cd "$OUT" && pwd)
CKPT_DIR=$(cd "$CKPT_DIR" && pwd)  # absolute: the jobs run from train_env.sh's folder
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source "$(dirname "$0")/train_env.sh"  # REPO, SHIM (cd there), PY, PYTHONPATH
DEADLINE=$((START + TOTAL))
LEFT=$((DEADLINE - $(date +%s) - 2))
PIDS=() NAMES=()
for job in "$@"; do
    read -r NAME ARCH ARGS <<<"$job"
    rm -rf "${CKPT_DIR:?}/$NAME"
    # shellcheck disable=SC2086
    VTOKEN_TRAIN_COMMAND="OUT=<out> bash vtoken/zoo/train_jobs.sh '$job' (BUDGET=$BUDGET TOTAL=$TOTAL)" \
    timeout -k 3 "$LEFT" $PY -m vtoken.zoo.train --arch "$ARCH" --out "$CKPT_DIR/$NAME" --tar "$OUT/$NAME.tar" \
        --time-budget "$BUDGET" --deadline "$DEADLINE" --eval-reserve 100 --workers "$WORKERS" --eval-workers 2 \
        $ARGS >"$OUT/$NAME.log" 2>&1 &
    PIDS+=($!) NAMES+=("$NAME")
done
RC=0
{
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    for i in "${!PIDS[@]}"; do
        wait "${PIDS[$i]}"; r=$?
        [ "$r" = 0 ] || RC=1
        echo "${NAMES[$i]}: exit $r (124 = hard timeout)"
        m="$CKPT_DIR/${NAMES[$i]}/metrics.json"
        [ -f "$m" ] || { echo "  no metrics.json"; continue; }
        $PY - "$m" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
ft, rk, dt = m.get("synthetic_unpruned_first_token", {}), m.get("synthetic_random_keep", {}), m.get("synthetic_detail_test", {})
print(f"  steps {m['steps']} (best {m['best_step']}, val {m['best_val_acc']}), {m['train_time_s']} s, "
      f"{m['checkpoint_bytes'] / 2**20:.2f} MiB, recipe {m['recipe']}")
print(f"  unpruned {ft.get('accuracy')}  random keep {rk.get('keep')}: {rk.get('accuracy')}  detail {dt.get('accuracy')}"
      f"  easy-vqa {m.get('easy_vqa_test', {}).get('accuracy')}")
print(f"  per qtype: {ft.get('per_qtype')}")
print(f"  last val: {m['log'][-1] if m.get('log') else None}")
print(f"  targets: {m.get('targets')}")
PYEOF
    done
    echo "wall: $(( $(date +%s) - START )) s"
} >"$OUT/summary.txt" 2>&1
for n in "${NAMES[@]}"; do
    echo "===== $n"
    grep -v "Warning\|it/s\]\|warnings.warn" "$OUT/$n.log" | grep -v '^ \|^{\|^}' | tail -n 12 | cut -c1-400
done
echo "===== summary"
cat "$OUT/summary.txt"
# one archive for the logs (the device tool brings back at most 8 files)
(cd "$OUT" && tar -cf logs.tar ./*.log && rm -f ./*.log)
rm -rf "$SHIM"
exit $RC
