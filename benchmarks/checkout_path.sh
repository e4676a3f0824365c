# Sourced by the GPU scripts: import vtoken from this checkout without pip. A temporary folder holds
# `vtoken/` (links to the checkout's vtoken/* and to the package-dir mapped folders scorers/, hooks/,
# kernels/, demos/) and goes first on PYTHONPATH; the repository root itself never goes on sys.path
# (its top-level kernels/ would shadow the PyPI package `kernels`).
#   REPO=<checkout> . benchmarks/checkout_path.sh     -> exports PYTHONPATH, sets VTOKEN_SHIM
VTOKEN_SHIM=$(mktemp -d); mkdir "$VTOKEN_SHIM/vtoken"
for _f in "$REPO"/vtoken/*; do ln -s "$_f" "$VTOKEN_SHIM/vtoken/$(basename "$_f")"; done
for _d in scorers hooks kernels demos; do [ -d "$REPO/$_d" ] && ln -sfn "$REPO/$_d" "$VTOKEN_SHIM/vtoken/$_d"; done
export PYTHONPATH="$VTOKEN_SHIM${PYTHONPATH:+:$PYTHONPATH}"
