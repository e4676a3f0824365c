#!/usr/bin/env bash
# End-to-end GPU benchmark (issue 8), as run on the lent H100: OUT=dir bash benchmarks/e2e/run_gpu.sh [args]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/vtoken-e2e}; mkdir -p "$OUT"
# Import vtoken from this checkout without pip: vtoken/ plus the package-dir mapped folders, from a
# folder that does not put the repository's top-level kernels/ on sys.path.
VT=$(mktemp -d); cp -r vtoken "$VT/vtoken"
for d in kernels hooks scorers; do rm -rf "$VT/vtoken/$d"; ln -s "$PWD/$d" "$VT/vtoken/$d"; done
export PYTHONPATH="$VT${PYTHONPATH:+:$PYTHONPATH}"
cd "$VT" && python3 -m vtoken.bench.cli --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt" | tail -60
