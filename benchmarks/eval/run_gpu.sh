#!/usr/bin/env bash
# The published retained-accuracy table at our scale (issue 21 item 5), one command on one GPU:
#
#   OUT=dir bash benchmarks/eval/run_gpu.sh [CHECKPOINT ...]     (default: tiny-llava tiny-qwen2vl)
#
# For each built-in checkpoint, every registered method (`vtoken eval --list-methods`) at the three
# default budgets on N held-out questions (default 1000) of each data set in DATA (default
# "synthetic synthetic-detail"; a checkpoint named *video* gets "synthetic-video"), with 95 %
# intervals and the paired test against `random` (vtoken eval's table). The tiny models leave the
# GPU idle, so each checkpoint runs as SHARDS processes (`vtoken eval --shard r/w`, default 6),
# all checkpoints at once, with --no-warmup (no untimed pass per method and budget: with several
# processes sharing the GPU the timing columns are not a measurement anyway; speed is `vtoken bench`'s
# job) and --reuse-vision on (each batch's vision features computed once for the methods that leave
# the tower alone: the same answers, the tower's work once instead of once per method and budget). Methods that cannot run on a model are skipped and reported by the
# table. HARD_TIMEOUT (default 540 s) bounds the whole command. The runs live in RUNS (default: a
# temporary folder, removed at the end); with RUNS=dir kept between calls, the same command resumes
# a killed run; RESUME=dir (a previous call's $OUT) unpacks each NAME.tar.gz found there into the run
# folder first, so a run cut by one device call's limit goes on in the next (same SHARDS). $OUT gets, per checkpoint, NAME.tar.gz (table.md, table.csv, results.json,
# predictions.jsonl, run logs; the part files of an unfinished run) and NAME.md (the table), plus
# env.txt.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
# shards share one GPU: freed blocks go back to it (each shard also empties its cache between configurations)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
OUT=${OUT:?set OUT=outdir}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
N=${N:-1000}; SHARDS=${SHARDS:-6}; DATA=${DATA:-synthetic synthetic-detail}
CKPTS=("$@"); [ ${#CKPTS[@]} -gt 0 ] || CKPTS=(tiny-llava tiny-qwen2vl)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# vtoken from this checkout without pip, from a folder that does not put the repository's
# top-level kernels/ on sys.path (it would shadow the PyPI package `kernels`)
. "$REPO/benchmarks/checkout_path.sh"; SHIM=$VTOKEN_SHIM
[ -d "$REPO/.whl/site/easy_vqa" ] && export PYTHONPATH="$PYTHONPATH:$REPO/.whl/site"
RUNS=${RUNS:-$SHIM/runs}; mkdir -p "$RUNS"; RUNS=$(cd "$RUNS" && pwd)
cd "$SHIM" || exit 1
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "N=$N SHARDS=$SHARDS DATA=$DATA checkpoints: ${CKPTS[*]}"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
METHODS=${METHODS:-$(python3 -m vtoken.eval --list-methods | grep -v "^none$" | paste -sd, -)}
echo "methods: $METHODS"
T0=$(date +%s)
export VTOKEN_EVAL_RUN_ID="run_gpu-$$-$T0"  # the shards' parents (timeout) differ: one id for this launch
PIDS=()
for ck in "${CKPTS[@]}"; do
  data=$DATA; case "$ck" in *video*) data=${VIDEO_DATA:-synthetic-video};; esac
  mkdir -p "$RUNS/$ck"
  if [ -n "${RESUME:-}" ] && [ -f "$RESUME/$ck.tar.gz" ] && [ ! -f "$RUNS/$ck/run_config.json" ]; then
    tar -xzf "$RESUME/$ck.tar.gz" -C "$RUNS/$ck" && echo "== $ck: resumed from $RESUME/$ck.tar.gz ($(cat "$RUNS/$ck"/predictions*.jsonl 2>/dev/null | wc -l) answers)"
  fi
  for ((r = 0; r < SHARDS; r++)); do
    # shellcheck disable=SC2086
    timeout -k 10 "${HARD_TIMEOUT:-540}" python3 -m vtoken.eval --model "vtoken/$ck" --data $data --limit "$N" \
      --methods "$METHODS" --batch-size "${BATCH:-32}" --max-new-tokens 4 --out "$RUNS/$ck" --no-progress --no-warmup --reuse-vision on \
      --shard "$r/$SHARDS" > "$RUNS/$ck/log-$r.txt" 2>&1 &
    PIDS+=($!)
  done
done
RC=0
for p in "${PIDS[@]}"; do wait "$p" || RC=1; done
echo "== all shards done after $(( $(date +%s) - T0 )) s (exit status $RC)"
for ck in "${CKPTS[@]}"; do
  d="$RUNS/$ck"
  [ -f "$d/table.md" ] && cp "$d/table.md" "$OUT/$ck.md" || { echo "== $ck: no table"; tail -20 "$d/log-0.txt"; }
  tar -czf "$OUT/$ck.tar.gz" -C "$d" .
  echo "== $ck"; [ -f "$d/table.md" ] && cat "$d/table.md"
done
rm -rf "$SHIM"
exit $RC
