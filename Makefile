# Quick start: `make run` (the main job) and `make test` (the test suite). Both create .venv first.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
# The CUDA part of the extension builds when nvcc is here; FASTRES_CUDA_BUILD=0 skips it.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)

# Extras make installs; `make EXTRAS=test` skips Ray (~600 MB), and its tests skip with a reason.
EXTRAS  ?= test,ray
comma   := ,
STAMP   := $(VENV)/.fastres-installed-$(subst $(comma),-,$(EXTRAS))
# oneDNN's GNU-OpenMP build, before the extension builds (x86-64 Linux wheels only): fastres._onednn,
# the CPU backend's convolutions as kept primitives. Without it the CPU backend calls PyTorch's
# oneDNN ops (the same answers, more host time per call) and says so.
ONEDNN  := $(if $(and $(filter Linux,$(shell uname -s)),$(filter x86_64,$(shell uname -m))),onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0,)

.PHONY: run test test-ray bench bench-ray gpu-check clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 pybind11 ninja $(ONEDNN)
	$(BIN)/pip install -q --no-build-isolation -e '.[$(EXTRAS)]'
	touch $@


# Main job: every architecture against its torchvision twin (GPU with fp16 if present, else CPU fp32),
# then one line of resnet50 images/s on this machine: torchvision, ONNX Runtime (when installed:
# make EXTRAS=test,ray,bench), the fastres module and Engine (a few seconds).
run: $(STAMP)
	$(BIN)/fastres verify
	$(BIN)/fastres bench --line

# With nvcc present the CUDA kernels must have been built (their spill check may not skip).
# tests/test_ray.py skips itself outside a loopback-only network namespace; test-ray runs it in one.
test: $(STAMP)
	FASTRES_REQUIRE_CUDA_BUILD=$(if $(CUDA_HOME),1,0) $(BIN)/python -m pytest -q
	@$(MAKE) --no-print-directory test-ray

# The Ray tests start clusters: they run in a network namespace with only loopback (.ci/loopback-netns:
# unshare -n, ip link set lo up), in a pytest process of their own. Where no such namespace can be
# made they are skipped with a notice, unless FASTRES_REQUIRE_RAY_TESTS=1 (CI).
test-ray: $(STAMP)
	@if .ci/loopback-netns true 2>/dev/null; then \
		echo ".ci/loopback-netns $(BIN)/python -m pytest -q tests/test_ray.py"; \
		.ci/loopback-netns $(BIN)/python -m pytest -q tests/test_ray.py; \
	elif [ "$${FASTRES_REQUIRE_RAY_TESTS:-0}" = 1 ]; then \
		echo "test-ray: cannot make a loopback-only network namespace here (unshare -n needs root or user namespaces)" >&2; exit 1; \
	else \
		echo "test-ray: SKIPPED tests/test_ray.py: cannot make a loopback-only network namespace here (unshare -n needs root or user namespaces)"; \
	fi

bench: $(STAMP)
	$(BIN)/python -m pytest bench/ -q

# On a CUDA machine: kernel + model tests on CUDA tensors, Engine graphs, autotune, resnet50 bench
# -> gpu-report/ (within 8 minutes). DRY_RUN=1 prints the plan and checks the imports (CI runs it).
gpu-check: $(STAMP)
	$(BIN)/python -m fastres.gpu_check $(if $(DRY_RUN),--dry-run,)

# fastres.ray.predict with 1 vs 2 actors (starts a local Ray cluster: loopback-only namespace)
bench-ray: $(STAMP)
	.ci/loopback-netns $(BIN)/python -m pytest bench/test_ray_actors.py -q -s

clean:
	rm -rf $(VENV) build *.egg-info fastres/_C*.so fastres/_guard*.so fastres/_cpu*.so fastres/_winograd*.so
