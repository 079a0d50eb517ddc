#!/usr/bin/env bash
# Opt-in: installs Google Benchmark (Debian libbenchmark-dev) if missing, then runs the CPU microbenchmarks.
# Not part of scripts/setup.sh: the tests and the package do not need it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! [ -e /usr/include/benchmark/benchmark.h ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update && $SUDO apt-get install -y libbenchmark-dev
fi
exec benchmarks/run_cpu_bench.sh "$@"
