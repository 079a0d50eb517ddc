#!/usr/bin/env bash
# Compile-checks every torch-free CUDA kernel (csrc/cuda/*.cu) with plain nvcc, for Ampere (sm_80, also the PTX
# a portable build ships) and Hopper (sm_90a): no GPU and no CUDA build of torch needed. Prints per-file, per-arch
# registers / spills (ptxas -v) and fails on
#   - any compile error or compiler warning,
#   - any register spill (a spill in these bandwidth-bound kernels is a performance bug),
#   - any __global__ kernel declared without __launch_bounds__ (without it a compiler may use more registers
#     than a large block can get, and the launch fails with "too many resources requested").
#   NVCC=nvcc  CUDA_ARCHS="80 90a"  JOBS=2
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
CUDA_ARCHS=${CUDA_ARCHS:-"80 90a"}
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
ARCH_FLAGS=""
for a in $CUDA_ARCHS; do ARCH_FLAGS+=" -gencode arch=compute_$a,code=sm_$a"; done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[cuda-check] $("$NVCC" --version | tail -n 2 | head -n 1); flags: -std=c++20 -O3$ARCH_FLAGS"
start=$(date +%s)
fail=0

# Every kernel states its launch bounds: `__global__ void __launch_bounds__(N)` on the declaration's first line.
missing=$(grep -n '__global__' "${files[@]}" csrc/cuda/*.cuh 2>/dev/null | grep -v '__launch_bounds__' || true)
if [ -n "$missing" ]; then
  echo "[cuda-check] FAIL kernels without __launch_bounds__ (write '__global__ void __launch_bounds__(N)'):"
  echo "$missing" | sed 's/^/    /'
  fail=1
fi

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
  warnings=$(grep -v '^ptxas info' "$log" | grep -ci 'warning' || true)
  # ptxas prints "Compiling entry function '...' for 'sm_XX'", then "N bytes stack frame, S bytes spill stores,
  # L bytes spill loads", then "Used R registers ...": one triple per kernel instantiation and arch.
  for a in $CUDA_ARCHS; do
    summary=$(awk -v arch="sm_$a" '
      /Compiling entry function/ { cur = ($0 ~ ("for .?" arch ".?$")); if (cur) n++ }
      cur && /spill stores/ { for (i = 1; i <= NF; i++) { if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "stores,") s += $i; if ($(i+2) == "spill" && $(i+3) == "loads") l += $i } }
      cur && /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) if ($i == "Used") { r = $(i+1); if (r > max) max = r; if (min == "" || r < min) min = r } }
      END { printf "%d kernels, registers %s..%s, spill stores %d B, spill loads %d B", n, min, max, s, l }' "$log")
    echo "[cuda-check] ok   $f [sm_$a]: $summary"
    if echo "$summary" | grep -Eq '^0 kernels'; then
      echo "[cuda-check] FAIL $f: no kernel compiled for sm_$a"
      fail=1
    fi
    if echo "$summary" | grep -Eq 'spill (stores|loads) [1-9]'; then
      echo "[cuda-check] FAIL $f spills registers on sm_$a:"
      grep -A2 "for 'sm_$a'" "$log" | grep -B2 -E '[1-9][0-9]* bytes spill' | sed 's/^/    /'
      fail=1
    fi
  done
  if [ "$warnings" != 0 ]; then
    echo "[cuda-check] FAIL $f: $warnings compiler warning(s):"
    grep -v '^ptxas info' "$log" | grep -i 'warning' | sed 's/^/    /'
    fail=1
  fi
done
echo "[cuda-check] ${#files[@]} file(s) x archs [$CUDA_ARCHS] in $(( $(date +%s) - start )) s"
if [ "$fail" != 0 ]; then
  echo "[cuda-check] FAILED" >&2
  exit 1
fi
echo "[cuda-check] all CUDA kernels compile for [$CUDA_ARCHS] without spills, each with launch bounds"
