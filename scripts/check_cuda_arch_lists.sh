#!/usr/bin/env bash
# Configures the CUDA build (CMake + the CUDA build of torch, no GPU needed) with each spelling of
# TORCH_CUDA_ARCH_LIST users write, compiles one CUDA kernel of the extension through the real build rules, and
# checks the -gencode flags and the generated build-info header:
#   "8.0;9.0+PTX"  (';'-separated, torch's documented form)   -> sm_80 sm_90 + compute_90 PTX
#   "8.0 9.0a"     (space-separated)                          -> sm_80 sm_90a, no PTX
#   unset          (the portable default)                     -> PTX of the oldest supported arch, sm_80, sm_90a
# Needs the venv of scripts/check_cuda_build.sh (created there).   VENV=/tmp/venv-cuda  WORK=/tmp/dip-arch-lists
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/venv-cuda}
WORK=${WORK:-/tmp/dip-arch-lists}
PY="$VENV/bin/python"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
start=$(date +%s)
[ -x "$PY" ] || { echo "[arch-lists] error: no python at $PY (run scripts/check_cuda_build.sh once)" >&2; exit 1; }
export PATH="$VENV/bin:$PATH"  # the venv's cmake (>= 3.26) and ninja

# check NAME ARCH_LIST(or "-" for unset) EXPECTED_SASS EXPECTED_PTX
check() {
  local name=$1 list=$2 want_sass=$3 want_ptx=$4 dir="$WORK/$1"
  rm -rf "$dir"
  mkdir -p "$dir"
  local t0
  t0=$(date +%s)
  (
    if [ "$list" = "-" ]; then unset TORCH_CUDA_ARCH_LIST; else export TORCH_CUDA_ARCH_LIST="$list"; fi
    cmake -S . -B "$dir" -G Ninja -DPython_EXECUTABLE="$PY" -DDIP_EXT_CUDA=ON -DSKBUILD_PROJECT_VERSION=0.0.0 \
      >"$dir/configure.log" 2>&1
  ) || { echo "[arch-lists] FAIL $name: configure failed:"; tail -n 30 "$dir/configure.log" | sed 's/^/    /'; return 1; }
  local obj="CMakeFiles/_C.dir/csrc/cuda/scatter_add.cu.o"
  if ! ninja -C "$dir" "$obj" >"$dir/build.log" 2>&1; then
    echo "[arch-lists] FAIL $name: compiling $obj failed:"
    tail -n 30 "$dir/build.log" | sed 's/^/    /'
    return 1
  fi
  local cmd header
  cmd=$(ninja -C "$dir" -t commands "$obj" | tail -n 1)
  header="$dir/generated/dip_ext_build_info.h"
  "$PY" - "$name" "$header" "$want_sass" "$want_ptx" "$cmd" <<'PY' || return 1
import re, subprocess, sys
name, header, want_sass, want_ptx, cmd = sys.argv[1:]
text = open(header).read()
defs = dict(re.findall(r'#define (DIP_EXT_\w+) "([^"]*)"', text))
got = {"sass": sorted(defs["DIP_EXT_CUDA_SASS"].split()), "ptx": sorted(defs["DIP_EXT_CUDA_PTX"].split())}
want = {"sass": sorted(want_sass.split()), "ptx": sorted(want_ptx.split())}
flags_sass = sorted(set(re.findall(r"code=(sm_\w+)", cmd)))
flags_ptx = sorted(set(re.findall(r"code=(compute_\w+)", cmd)))
problems = []
if got != want:
    problems.append(f"build info says {got}, expected {want}")
if (flags_sass, flags_ptx) != (want["sass"], want["ptx"]):
    problems.append(f"nvcc got -gencode for {flags_sass} + PTX {flags_ptx}, expected {want}")
# the header must be valid C++ with exactly these strings
r = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", "-x", "c++", "-include", header, "/dev/null"],
                   capture_output=True, text=True)
if r.returncode:
    problems.append("the generated header does not compile: " + r.stderr[-500:])
if problems:
    sys.exit(f"[arch-lists] FAIL {name}: " + "; ".join(problems))
print(f"[arch-lists] ok   {name}: list '{defs['DIP_EXT_CUDA_ARCH_LIST']}' ({defs['DIP_EXT_CUDA_ARCH_SOURCE']}) "
      f"-> machine code {got['sass']}, PTX {got['ptx'] or 'none'}")
PY
  echo "[arch-lists]      $name: configure + one kernel in $(( $(date +%s) - t0 )) s"
}

# The default: PTX + machine code of the oldest arch both this torch and this nvcc support, machine code for
# sm_80 and sm_90a when newer, and for each visible GPU nvcc knows (none on a CI machine).
read -r oldest default_sass < <("$PY" - <<'PY'
import subprocess, torch
nvcc = set(subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True).stdout.split())
num = lambda a: int(a[3:].rstrip("af"))
codes = [a for a in torch.cuda.get_arch_list() if a.startswith("sm_") and (not nvcc or a in nvcc)]
oldest = min(codes, key=num) if codes else "sm_80"
sass = [oldest] + [a for a in ("sm_80", "sm_90a") if num(a) > num(oldest) and (not nvcc or a.rstrip("a") in nvcc)]
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        a = "sm_%d%d" % torch.cuda.get_device_capability(i)
        if num(a) >= num(oldest) and (not nvcc or a in nvcc) and not (a == "sm_90" and "sm_90a" in sass):
            sass.append(a)
print(oldest, " ".join(dict.fromkeys(sass)))
PY
)

fail=0
check semicolon "8.0;9.0+PTX" "sm_80 sm_90" "compute_90" || fail=1
check space "8.0 9.0a" "sm_80 sm_90a" "" || fail=1
check default - "$default_sass" "${oldest/sm_/compute_}" || fail=1
echo "[arch-lists] done in $(( $(date +%s) - start )) s"
exit $fail
