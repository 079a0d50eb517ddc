#!/usr/bin/env bash
# Installs llama-cpp-python (llama.cpp's Python binding) into the venv, for the GGUF export's test
# (tests/test_export_gguf.py). No binary wheel of it is reachable from these machines: the first run builds one from
# the sdist (~6.5 min on 2 cores; CPU only, tests/tools/server/multimodal off, GGML_NATIVE off so the wheel runs on
# any x86-64 CPU) and keeps it in the cache; later runs install the cached wheel in seconds. Idempotent.
#   VENV=.venv  DIP_EXT_CACHE=~/.cache/dip_ext  LLAMA_CPP_VERSION=0.3.36
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
CACHE=${DIP_EXT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dip_ext}
WHEELS="$CACHE/wheels/llama-cpp-python-$VERSION"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

if "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$VERSION')" \
    2>/dev/null; then
  echo "[llama-cpp] llama-cpp-python $VERSION already in $VENV"
  exit 0
fi
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "[llama-cpp] building llama-cpp-python $VERSION from its sdist into $WHEELS (~6.5 min on 2 cores)"
  mkdir -p "$WHEELS"
  start=$(date +%s)
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    $PIP wheel --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$WHEELS.part"
  mv "$WHEELS.part"/llama_cpp_python-*.whl "$WHEELS"/ && rmdir "$WHEELS.part"
  echo "[llama-cpp] built in $(( $(date +%s) - start )) s"
fi
# its dependencies (numpy, jinja2, diskcache, typing-extensions) within the versions the venv was tested with
LOCK=${DIP_EXT_LOCK-requirements-lock.txt}
$PIP install ${LOCK:+-c "$LOCK"} --find-links "$WHEELS" "llama-cpp-python==$VERSION"
echo "[llama-cpp] installed llama-cpp-python $VERSION into $VENV"
