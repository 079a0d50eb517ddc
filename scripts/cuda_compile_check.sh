#!/usr/bin/env bash
# Compile-checks every torch-free CUDA kernel (csrc/cuda/*.cu) for Hopper (sm_90a) with plain nvcc: no GPU
# and no CUDA build of torch needed. Prints per-kernel registers / spills (ptxas -v) and fails on any
# compile error or on any register spill (a spill in these bandwidth-bound kernels is a performance bug).
#   NVCC=nvcc  CUDA_ARCH_FLAGS="-gencode arch=compute_90a,code=sm_90a"  JOBS=2
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCH_FLAGS=${CUDA_ARCH_FLAGS:-"-gencode arch=compute_90a,code=sm_90a"}
JOBS=${JOBS:-2}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "[cuda-check] error: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 1
fi
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "[cuda-check] error: no csrc/cuda/*.cu files found" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[cuda-check] $("$NVCC" --version | tail -n 2 | head -n 1); flags: -std=c++20 -O3 $ARCH_FLAGS"
start=$(date +%s)

compile() {  # $1 = source; writes $tmp/<name>.log and .rc
  local src=$1 name
  name=$(basename "$src" .cu)
  set +e
  # shellcheck disable=SC2086
  "$NVCC" -std=c++20 -O3 $ARCH_FLAGS -Xptxas -v -Icsrc -c "$src" -o "$tmp/$name.o" >"$tmp/$name.log" 2>&1
  echo $? >"$tmp/$name.rc"
  set -e
}

running=0
for f in "${files[@]}"; do
  compile "$f" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n || true; running=$((running - 1)); fi
done
wait

fail=0
for f in "${files[@]}"; do
  name=$(basename "$f" .cu)
  rc=$(cat "$tmp/$name.rc")
  log="$tmp/$name.log"
  if [ "$rc" != 0 ]; then
    echo "[cuda-check] FAIL $f (nvcc exit $rc)"
    grep -v '^ptxas info' "$log" | sed 's/^/    /'
    fail=1
    continue
  fi
  # ptxas prints "Compiling entry function" then "N bytes stack frame, S bytes spill stores, L bytes spill
  # loads" then "Used R registers ...", one triple per kernel instantiation.
  summary=$(awk '
    /Compiling entry function/ { n++ }
    /spill stores/ { for (i = 1; i <= NF; i++) { if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "stores,") s += $i; if ($(i+2) == "spill" && $(i+3) == "loads") l += $i } }
    /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) if ($i == "Used") { r = $(i+1); if (r > max) max = r; if (min == "" || r < min) min = r } }
    END { printf "%d kernels, registers %s..%s, spill stores %d B, spill loads %d B", n, min, max, s, l }' "$log")
  warnings=$(grep -ci 'warning' "$log" || true)
  echo "[cuda-check] ok   $f: $summary, $warnings warning(s)"
  if [ "$warnings" != 0 ]; then grep -i 'warning' "$log" | sed 's/^/    /'; fi
  if echo "$summary" | grep -Eq 'spill (stores|loads) [1-9]'; then
    echo "[cuda-check] FAIL $f spills registers:"
    grep -B2 -E '[1-9][0-9]* bytes spill' "$log" | sed 's/^/    /'
    fail=1
  fi
done
echo "[cuda-check] ${#files[@]} file(s) in $(( $(date +%s) - start )) s"
if [ "$fail" != 0 ]; then
  echo "[cuda-check] FAILED" >&2
  exit 1
fi
echo "[cuda-check] all CUDA kernels compile for sm_90a"
