#!/usr/bin/env bash
# Builds the FULL extension (CPU + CUDA kernels + CUDA glue) against the CUDA 13.0 build of torch 2.14.1 on a
# machine WITHOUT a GPU, then imports it and checks that the CUDA kernels are registered and what GPU code it
# holds. It checks that the glue compiles and links; it runs nothing on a GPU (tests/test_ops_cuda.py and
# dip_ext.selftest do that on a GPU machine). Before the build, scripts/check_cuda_arch_lists.sh configures and
# compiles one kernel with each TORCH_CUDA_ARCH_LIST spelling (SKIP_ARCH_LISTS=1 skips it).
# The build itself uses the portable default arch list unless TORCH_CUDA_ARCH_LIST is set.
#   VENV=/tmp/venv-cuda  BUILD_DIR=/tmp/build-cuda-torch  TORCH_SPEC=torch==2.14.1  PYTHON=python3
# First run: ~1 min to create the venv (5.4 GB, torch comes from the local wheel mirror), then the build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/venv-cuda}
BUILD_DIR=${BUILD_DIR:-/tmp/build-cuda-torch}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
PYTHON=${PYTHON:-python3}
start=$(date +%s)
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  echo "[cuda-build] creating $VENV with $TORCH_SPEC (CUDA build) and the build tools"
  "$PYTHON" -m venv "$VENV"
  $PIP install "$TORCH_SPEC"
fi
if ! "$VENV/bin/python" -c "import scikit_build_core, pybind11, cmake, ninja, numpy" 2>/dev/null; then
  $PIP install scikit-build-core cmake ninja pybind11 numpy
fi
"$VENV/bin/python" -c "import torch; print('[cuda-build] torch', torch.__version__, 'cuda', torch.version.cuda)"
command -v nvcc >/dev/null || { echo "[cuda-build] error: nvcc not on PATH" >&2; exit 1; }

# Recipe traps (../shared/ENVIRONMENT.md): torch's CMake derives the CUDA root from nvcc's path (a wrapper
# here) unless CUDA_PATH is set; DIP_EXT_CUDA=ON makes a silent CPU-only fallback an error.
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export DIP_EXT_CUDA=ON
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}

if [ "${SKIP_ARCH_LISTS:-0}" != 1 ]; then
  VENV="$VENV" bash scripts/check_cuda_arch_lists.sh
fi

echo "[cuda-build] building into $BUILD_DIR (CUDA_PATH=$CUDA_PATH, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST-<unset: portable default>})"
build_start=$(date +%s)
$PIP install --no-build-isolation --no-deps . -Cbuild-dir="$BUILD_DIR" -Cbuild.verbose=false
build_s=$(( $(date +%s) - build_start ))

# Load the compiled module directly: the package's __init__ may import runtime deps (transformers, ...) that
# this build-only venv does not have.
(cd /tmp && "$VENV/bin/python" - <<'PY'
import glob, importlib.machinery, importlib.util, os, site, sys
import torch
roots = site.getsitepackages()
so = [p for r in roots for p in glob.glob(os.path.join(r, "dip_ext", "_C*.so"))]
if not so:
    sys.exit("[cuda-build] error: no installed dip_ext/_C*.so found in " + ", ".join(roots))
spec = importlib.util.spec_from_file_location("dip_ext._C", so[0])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
info = dict(mod.build_info())
print("[cuda-build] build_info:", info)
if not info.get("cuda"):
    sys.exit("[cuda-build] error: the extension was built WITHOUT CUDA kernels")
if not info.get("cuda_sass"):
    sys.exit("[cuda-build] error: build_info lists no machine code (cuda_sass)")
if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not info.get("cuda_ptx"):
    sys.exit("[cuda-build] error: the default (portable) build holds no PTX: later GPUs could not run it")
ops = ["rms_norm_gather", "layer_norm_gather", "index_select_gemm", "scatter_add_", "gemm_scatter_add_",
       "calibration_stats_"]
missing = [o for o in ops for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dip_ext::{o}", key)]
if missing:
    sys.exit(f"[cuda-build] error: ops without a kernel: {missing}")
print(f"[cuda-build] all {len(ops)} ops have CPU and CUDA kernels")
PY
)
echo "[cuda-build] OK: build ${build_s} s, total $(( $(date +%s) - start )) s"
