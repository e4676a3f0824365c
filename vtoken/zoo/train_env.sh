# Sourced by train_both.sh, train_video.sh and train_jobs.sh (from the repo's vtoken/zoo/): run from a folder that
# holds only the vtoken package (with scorers/, hooks/, kernels/ linked in as vtoken.scorers etc., as
# the installed package maps them): from the repository root, the top-level kernels/ folder would
# shadow the PyPI package `kernels` that transformers probes. Sets REPO, SHIM, PY and PYTHONPATH and
# changes into SHIM (remove it with `rm -rf "$SHIM"` at the end). easy-vqa: used if importable, or if
# the repository carries a copy of the package in .whl/site/easy_vqa.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SHIM=$(mktemp -d)
mkdir "$SHIM/vtoken"
for f in "$REPO"/vtoken/*; do ln -s "$f" "$SHIM/vtoken/$(basename "$f")"; done
for d in scorers hooks kernels; do [ -d "$REPO/$d" ] && ln -sfn "$REPO/$d" "$SHIM/vtoken/$d"; done
cd "$SHIM"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$REPO/.whl/site/easy_vqa" ] && export PYTHONPATH="$PYTHONPATH:$REPO/.whl/site"
PY=${PYTHON:-python3}
