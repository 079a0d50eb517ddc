#!/usr/bin/env bash
# The ONE script for the GPU machine (H200, torch 2.11+cu130, no network): builds dip_ext from source, runs
# dip_ext.selftest on the GPU first (every op against its torch reference, all dtypes), then the CUDA tests, the
# CUDA kernel microbenchmark and (when present) the end-to-end benchmark, and writes everything into OUTDIR:
#   env.txt            nvidia-smi, python / torch / nvcc versions
#   build.log          the pip build           build_info.json   dip_ext.build_info() of the installed package
#   selftest.log       selftest table          selftest.json     per-case max errors, pass / fail
#   pytest.log         CUDA tests (marker cuda) junit_ops_cuda.xml   pytest_crash_stack.log  native stack of a crash
#   bench_ops_cuda.log kernel benchmark table  ops_cuda.json
#   e2e.log            end-to-end benchmark    e2e.json
#   summary.json       per step: exit code, seconds, status; test counts; ceilings
# Every step has a time limit; a failing step is recorded and the script goes on (steps that need the build
# are skipped when it failed). The whole run stays under ~8 minutes. Exit code 0 only if every step passed.
# The build uses the portable default arch list (PTX + machine code of the oldest supported arch, sm_80, sm_90a,
# and the visible GPU) unless TORCH_CUDA_ARCH_LIST is set (TORCH_CUDA_ARCH_LIST=9.0a builds faster).
#   usage: bash benchmarks/gpu/check.sh OUTDIR        (PYTHON=python3 by default: the python that has torch)
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(pwd)
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-465}  # leaves headroom under 8 minutes for the summary and process teardown

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  for p in python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" >/dev/null 2>&1; then PYTHON=$p; break; fi
  done
fi
export PYTHONSAFEPATH=1                 # never import the source dip_ext/ (no compiled _C) from the cwd
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_BREAK_SYSTEM_PACKAGES=1      # the GPU machine's python may be "externally managed"
export PIP_NO_INDEX=1                   # no network there: never try an index
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export DIP_EXT_CUDA=ON                  # a silent CPU-only build would make every CUDA test skip

STEPS_FILE="$OUT/steps.tsv"
: >"$STEPS_FILE"

# run_step NAME LIMIT_S LOGFILE CMD...: runs CMD with a time limit (capped by what is left of the budget),
# logs stdout+stderr, prints the log's tail, and records name / rc / seconds / status.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((BUDGET_S - ($(date +%s) - T0)))
  if [ "$left" -lt 20 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" "-" 0 "skipped: out of time budget" >>"$STEPS_FILE"
    echo "=== $name: SKIPPED (time budget spent)"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit} s) ..."
  local s rc status
  s=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - s ))
  case $rc in
    0) status=ok ;;
    124|137) status="timeout after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$status" >>"$STEPS_FILE"
  echo "=== $name: $status in ${secs} s; last lines of $(basename "$log"):"
  tail -n "${TAIL_LINES:-15}" "$log" | cut -c1-220
  return $rc
}

skip_step() {
  printf '%s\t%s\t%s\t%s\n' "$1" "-" 0 "skipped: $2" >>"$STEPS_FILE"
  echo "=== $1: SKIPPED ($2)"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "python: $PYTHON ($(command -v "$PYTHON"))"
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  "$PYTHON" -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -n 1
  echo "nvcc: $(nvcc --version 2>&1 | tail -n 2 | head -n 1)"
  echo "TORCH_CUDA_ARCH_LIST: ${TORCH_CUDA_ARCH_LIST-<unset: portable default>}"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"
  timeout 30 nvidia-smi 2>&1 | head -n 20
} >"$OUT/env.txt" 2>&1
head -n 8 "$OUT/env.txt"

# 1. Build and install from source (binaries built elsewhere do not load there). SKIP_BUILD=1 reuses the
# dip_ext already installed (to rerun the later steps after a successful build).
build_ok=0
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  skip_step build "SKIP_BUILD=1 (using the installed dip_ext)"
  build_cmd=(true)
else
  build_cmd=("$PYTHON" -m pip install --no-build-isolation --no-deps -v . -Cbuild-dir="${BUILD_DIR:-/tmp/dip_ext_gpu_build}")
fi
if [ "${SKIP_BUILD:-0}" = 1 ] || run_step build 330 "$OUT/build.log" "${build_cmd[@]}"; then
  if (cd /tmp && "$PYTHON" -c "
import json, sys, torch, dip_ext
info = dip_ext.build_info()
json.dump(info, open(sys.argv[1], 'w'), indent=1)
print(info)
sys.exit(0 if info.get('cuda') else 'built without CUDA kernels')" "$OUT/build_info.json") >>"$OUT/build.log" 2>&1; then
    build_ok=1
    printf '%s\t%s\t%s\t%s\n' import 0 0 ok >>"$STEPS_FILE"
    tail -n 1 "$OUT/build.log"
  else
    echo "=== import of the installed dip_ext failed:"; tail -n 15 "$OUT/build.log"
    printf '%s\t%s\t%s\t%s\n' import 1 0 "failed: see build.log" >>"$STEPS_FILE"
  fi
fi

# 2. Self-test first: every op against its plain-torch reference on the GPU (fp32 / fp16 / bf16); the table goes
# to the log, the cases to selftest.json. A failure is recorded and the later steps still run (they say more).
if [ "$build_ok" = 1 ]; then
  TAIL_LINES=60 run_step selftest 120 "$OUT/selftest.log" env -C /tmp "$PYTHON" -c "
import json, sys
from dip_ext.selftest import selftest
r = selftest('cuda')
print(r.table())
json.dump(r.to_dict(), open(sys.argv[1], 'w'), indent=1)
sys.exit(0 if r.ok else 1)" "$OUT/selftest.json"
else
  skip_step selftest "build failed"
fi

# 3. CUDA tests: every test marked `cuda` (the ops, the fused norm, autocast on the compacted families), with
# junit XML for the record.
if [ "$build_ok" = 1 ]; then
  TAIL_LINES=25 run_step tests 200 "$OUT/pytest.log" \
    "$PYTHON" -m pytest tests/test_ops_cuda.py tests/test_ops_rms_norm_scatter_add_cuda.py tests/test_autocast.py \
    -m cuda -q -rfE -p no:cacheprovider --junitxml="$OUT/junit_ops_cuda.xml"
  tests_rc=$?
  # Killed by a signal (a crash in native code): Python's faulthandler only names the Python frames. Run the
  # tests again up to the crash with a handler that prints the native stack (segv_backtrace.c; no gdb there).
  if [ "$tests_rc" -gt 128 ] && [ "$tests_rc" -ne 137 ] && cc -shared -fPIC -O1 -o /tmp/dip_ext_segv.so \
       benchmarks/gpu/segv_backtrace.c 2>/dev/null; then
    TAIL_LINES=40 run_step tests_crash_stack 90 "$OUT/pytest_crash_stack.log" env LD_PRELOAD=/tmp/dip_ext_segv.so \
      "$PYTHON" -m pytest tests/test_ops_cuda.py tests/test_ops_rms_norm_scatter_add_cuda.py tests/test_autocast.py \
      -m cuda -x -q -p no:cacheprovider -p no:faulthandler
  fi
else
  skip_step tests "build failed"
fi

# 4. Kernel microbenchmark with copy / GEMM ceilings.
if [ "$build_ok" = 1 ]; then
  TAIL_LINES=60 run_step bench_ops 150 "$OUT/bench_ops_cuda.log" \
    "$PYTHON" "$REPO/benchmarks/bench_ops_cuda.py" --out "$OUT/ops_cuda.json"
else
  skip_step bench_ops "build failed"
fi

# 5. End-to-end benchmark, when it exists: whatever time is left.
if [ ! -f "$REPO/benchmarks/e2e.py" ]; then
  skip_step e2e "benchmarks/e2e.py does not exist"
elif [ "$build_ok" = 1 ]; then
  TAIL_LINES=40 run_step e2e 400 "$OUT/e2e.log" \
    "$PYTHON" "$REPO/benchmarks/e2e.py" --device cuda --kv-ratio 0.5 --out "$OUT/e2e.json"
else
  skip_step e2e "build failed"
fi

# Summary (plain python: no dip_ext import, works even when the build failed).
"$PYTHON" - "$OUT" "$(( $(date +%s) - T0 ))" <<'PY'
import json, os, sys
import xml.etree.ElementTree as ET
out, total = sys.argv[1], int(sys.argv[2])
steps = {}
for line in open(os.path.join(out, "steps.tsv")):
    name, rc, secs, status = line.rstrip("\n").split("\t")
    steps[name] = {"rc": None if rc == "-" else int(rc), "seconds": int(secs), "status": status}
summary = {"total_seconds": total, "steps": steps,
           "all_ok": all(s["status"] == "ok" or s["status"].startswith(("skipped: benchmarks/e2e.py",
                                                                        "skipped: SKIP_BUILD"))
                         for s in steps.values())}
junit = os.path.join(out, "junit_ops_cuda.xml")
if os.path.exists(junit):
    try:
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        summary["tests"]["failed_names"] = [
            f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
            if c.find("failure") is not None or c.find("error") is not None][:50]
        if summary["tests"]["tests"] and summary["tests"]["skipped"] == summary["tests"]["tests"]:
            summary["tests"]["note"] = "every test was skipped: torch saw no CUDA device"
            summary["all_ok"] = False
    except Exception as e:  # noqa: BLE001
        summary["tests"] = {"error": repr(e)}
for key, fname in (("build_info", "build_info.json"), ("selftest", "selftest.json"), ("ops_cuda", "ops_cuda.json"),
                   ("e2e", "e2e.json")):
    p = os.path.join(out, fname)
    if os.path.exists(p):
        try:
            data = json.load(open(p))
        except Exception as e:  # noqa: BLE001
            summary[key] = {"error": repr(e)}
            continue
        if key == "ops_cuda":
            summary[key] = {"ceilings": data.get("ceilings"), "rows": len(data.get("results", [])),
                            "errors": len(data.get("errors", [])), "max_abs_err": data.get("max_abs_err")}
        elif key == "build_info":
            summary[key] = data
        elif key == "selftest":
            summary[key] = {"ok": data.get("ok"), "cases": len(data.get("cases", [])),
                            "failed": [f"{c['op']} {c['dtype']} {c['case']}: {c.get('error') or c.get('ratio')}"
                                       for c in data.get("cases", []) if not c.get("passed")][:30]}
        else:
            summary[key] = "see e2e.json"
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print("=== summary:", json.dumps({k: v for k, v in summary.items() if k != "build_info"}, indent=1)[:3000])
sys.exit(0 if summary["all_ok"] else 1)
PY
