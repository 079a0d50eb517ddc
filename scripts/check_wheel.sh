#!/usr/bin/env bash
# Builds the wheel (reusing the CMake build folder) and checks what it ships: the compiled extension, every
# module of the package, no tests. Usage: VENV=.venv bash scripts/check_wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$VENV/bin/python" -m pip --disable-pip-version-check -q wheel --no-build-isolation --no-deps . -w "$out"
"$VENV/bin/python" - "$out" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("dip_ext-*.whl"))
names = set(zipfile.ZipFile(wheel).namelist())
want = {str(p) for p in pathlib.Path("dip_ext").rglob("*.py")}
missing = sorted(want - names)
so = [n for n in names if n.startswith("dip_ext/_C") and n.endswith(".so")]
bad = sorted(n for n in names if n.startswith("tests/"))
if missing or not so or bad:
    sys.exit(f"[wheel] {wheel.name}: missing {missing}, extension {so}, unexpected {bad}")
print(f"[wheel] {wheel.name}: {len(want)} modules + {so[0]} ok")
PY
