#!/usr/bin/env bash
# Every GPU-marked test of a checkout, on a machine where vtoken is not pip-installed (the lent GPU
# machine): `bash benchmarks/gpu_tests.sh [TREE] > log` (TREE defaults to this checkout; TESTS="file ..."
# picks test files, default the whole tests/ folder).
# vtoken/ and the package-dir mapped folders are linked into a temporary folder on PYTHONPATH, and
# PYTHONSAFEPATH keeps the checkout root (whose bare vtoken/ lacks the mapped subpackages) off sys.path.
set -o pipefail
TREE=$(cd "${1:-.}" && pwd)
VT=$(mktemp -d); cp -r "$TREE/vtoken" "$VT/vtoken"
for d in kernels hooks scorers demos; do
  if [ -d "$TREE/$d" ]; then rm -rf "$VT/vtoken/$d"; ln -s "$TREE/$d" "$VT/vtoken/$d"; fi
done
export PYTHONPATH="$VT${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
cd "$TREE" || exit 1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
git log -1 --format='commit %h %s' 2>/dev/null || true
# shellcheck disable=SC2086
python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS:-tests}
