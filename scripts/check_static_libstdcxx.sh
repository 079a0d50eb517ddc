#!/usr/bin/env bash
# Builds the extension with libstdc++ linked statically into it, as some toolchains do (the GPU machine's
# /opt/gcc), and runs the ops' bad-input tests against that build: a static copy of libstdc++ that leaks its
# symbols into the process makes every error message that streams an integer crash or come out truncated.
# The build goes into a scratch folder; the venv's own dip_ext is left as it is.
#   VENV=.venv  OUT=/tmp/dip_ext_static_libstdcxx  BUILD_DIR=/tmp/build-static-libstdcxx
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-/tmp/dip_ext_static_libstdcxx}
BUILD_DIR=${BUILD_DIR:-/tmp/build-static-libstdcxx}
PY="$VENV/bin/python"
start=$(date +%s)
rm -rf "$OUT"
echo "[static-libstdc++] building into $OUT"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$PY" -m pip install -q --disable-pip-version-check \
  --no-build-isolation --no-deps --target "$OUT" . -Cbuild-dir="$BUILD_DIR" \
  "-Ccmake.define.CMAKE_MODULE_LINKER_FLAGS=-static-libstdc++"
so=$(ls "$OUT"/dip_ext/_C*.so)
leaked=$(nm -D --defined-only "$so" | grep -c "_ZNSo9_M_insertIlEERSoT_" || true)
echo "[static-libstdc++] built in $(( $(date +%s) - start )) s; std::ostream::_M_insert<long> exported: $leaked"
# -S: no .pth files, so the venv's editable dip_ext does not shadow the scratch build; the venv's packages
# come after it on the path.
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PYTHONSAFEPATH=1 PYTHONPATH="$OUT:$site" "$PY" -S -c "
import dip_ext, sys
assert dip_ext.__file__.startswith(sys.argv[1]), dip_ext.__file__" "$OUT"
PYTHONSAFEPATH=1 PYTHONPATH="$OUT:$site" "$PY" -S -m pytest -q -p no:cacheprovider tests/test_ops_bad_input.py
echo "[static-libstdc++] OK in $(( $(date +%s) - start )) s"
