#!/usr/bin/env bash
# Builds and runs the C++ CPU microbenchmarks (benchmarks/cpp), writing JSON to benchmarks/results/.
#
#   benchmarks/run_cpu_bench.sh [extra Google Benchmark flags, e.g. --benchmark_filter=rms]
#
# Env: PYTHON (the venv's python with torch; default .venv/bin/python, then python3), BUILD_DIR
# (default build/bench-cpu), DIP_EXT_BENCH_THREADS (torch threads, default 2), REPS (repetitions, default 5).
# Needs Google Benchmark: scripts/bench_cpu.sh installs Debian's libbenchmark-dev when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
BUILD_DIR=${BUILD_DIR:-build/bench-cpu}
REPS=${REPS:-5}
export DIP_EXT_BENCH_THREADS=${DIP_EXT_BENCH_THREADS:-2}
# cmake >= 3.26 and ninja come with the venv (the system cmake may be older)
PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH"

cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDIP_EXT_CUDA=OFF -DDIP_EXT_BENCHMARKS=ON \
  -DPython_EXECUTABLE="$("$PYTHON" -c 'import sys; print(sys.executable)')" >/dev/null
cmake --build "$BUILD_DIR" --target bench_ops_cpu

mkdir -p benchmarks/results
out="benchmarks/results/cpu_ops_$(date +%Y%m%d-%H%M%S).json"
# Interleaved repetitions and medians: the cores are shared, so a neighbour's burst hits both sides alike.
# The pair/* entries (ours and the ATen chain timed back to back) give the ratios of the targets.
"$BUILD_DIR/benchmarks/cpp/bench_ops_cpu" \
  --benchmark_repetitions="$REPS" --benchmark_report_aggregates_only=true \
  --benchmark_enable_random_interleaving=true --benchmark_min_time="${MIN_TIME:-0.5}" \
  --benchmark_out="$out" --benchmark_out_format=json "$@"
echo "results: $out"
