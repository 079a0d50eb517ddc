# One-command entry points for a fresh machine. Each target creates/refreshes .venv first.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup test test-fast prune cuda-check clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

# The full test suite (unit, property, exactness, and the real-model integration tests marked slow).
test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Everything except the slow real-model tests.
test-fast: setup
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# The main job: prune the embedded default model (SmolLM2-135M) and write ./dip-out.
prune: setup
	$(VENV)/bin/dip-ext prune

# Compile every torch-free CUDA kernel for Hopper with nvcc (no GPU needed).
cuda-check:
	bash scripts/cuda_compile_check.sh

clean:
	rm -rf build dist *.egg-info
