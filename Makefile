# One-command entry points for a fresh machine. Each target creates/refreshes .venv first.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup test test-fast prune cuda-check cuda-build-check cuda-build-check-oldest static-libstdcxx-check cuda-tests-on-cpu clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

# The full test suite (unit, property, exactness, and the real-model integration tests marked slow).
test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Everything except the slow real-model tests.
test-fast: setup
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# The main job: prune the embedded default model (SmolLM2-135M) by 30 % of its decoder-linear parameters with
# one-shot masks, recover it toward the dense model (140 distillation steps of 2 windows), and
# write ./dip-out. The combination that gave the best model for this wall time (benchmarks/RESULTS.md).
prune: setup
	$(VENV)/bin/dip-ext prune --method oneshot --refit off --recover distill --recover-batch 2 --recover-steps 140 \
		--recover-val-every 35

# Compile every torch-free CUDA kernel for Ampere (sm_80) and Hopper (sm_90a) with nvcc (no GPU needed):
# fails on errors, warnings, register spills and kernels without launch bounds.
cuda-check:
	bash scripts/cuda_compile_check.sh

# The full CUDA extension (glue included) against the CUDA build of torch, after configuring + compiling one
# kernel with each TORCH_CUDA_ARCH_LIST spelling (no GPU needed; creates /tmp/venv-cuda on first use).
cuda-build-check:
	bash scripts/check_cuda_build.sh

# The same build against the oldest torch the package admits (2.11, the GPU machine's: c10's CUDA helpers differ);
# not in CI, which would download torch 2.11 (~1 GB) on every clean run.
cuda-build-check-oldest:
	VENV=/tmp/venv-cuda211 BUILD_DIR=/tmp/build-cuda211 TORCH_SPEC=torch==2.11.0 SKIP_ARCH_LISTS=1 \
		bash scripts/check_cuda_build.sh

# The extension built with libstdc++ linked statically (as the GPU machine's toolchain does) must still raise
# whole error messages: its bad-input tests against that build (scratch folder; the venv is left alone).
static-libstdcxx-check: setup
	VENV=$(VENV) bash scripts/check_static_libstdcxx.sh

# The CUDA test file run against the CPU kernels: checks the tests themselves (references, tolerances).
# Uses the venv as `make setup` left it.
cuda-tests-on-cpu:
	DIP_EXT_TEST_DEVICE=cpu $(VENV)/bin/pytest -q tests/test_ops_cuda.py

clean:
	rm -rf build dist *.egg-info
