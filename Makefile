# Quick start: `make run` (the main job) and `make test` (the test suite). Both create .venv first.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fastres-installed
# The CUDA part of the extension builds when nvcc is here; FASTRES_CUDA_BUILD=0 skips it.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)

.PHONY: run test bench gpu-check clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 pybind11 ninja
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	touch $@

# Main job: every architecture against its torchvision twin (GPU with fp16 if present, else CPU fp32).
run: $(STAMP)
	$(BIN)/fastres verify

# With nvcc present the CUDA kernels must have been built (their spill check may not skip).
test: $(STAMP)
	FASTRES_REQUIRE_CUDA_BUILD=$(if $(CUDA_HOME),1,0) $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pytest bench/ -q

# On a CUDA machine: kernel + model tests on CUDA tensors, Engine graphs, autotune, resnet50 bench
# -> gpu-report/ (within 8 minutes). DRY_RUN=1 prints the plan and checks the imports (CI runs it).
gpu-check: $(STAMP)
	$(BIN)/python -m fastres.gpu_check $(if $(DRY_RUN),--dry-run,)

clean:
	rm -rf $(VENV) build *.egg-info fastres/_C*.so
