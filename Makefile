# mimscale: the README's commands.
VENV ?= .venv
PY := $(VENV)/bin/python
# Python 3.11 or 3.12 (a name or a path; scripts/find_python.sh resolves it, a pyenv shim included).
# Default: the existing venv's Python (so `make test` after `make setup PYTHON=python3.12` keeps it),
# else python3.11.
PYTHON ?= $(or $(shell sed -n 's/^version[_a-z]* *= *\([0-9]*\.[0-9]*\).*/python\1/p' $(VENV)/pyvenv.cfg 2>/dev/null | head -n 1),python3.11)
# FFCV=1: also the optional FFCV extra (its apt packages need root); 0: without it; auto (default):
# with it when its packages are there or can be installed, else without it and a message saying how.
FFCV ?= auto
STAMP := $(VENV)/.mimscale-installed-$(notdir $(PYTHON))-ffcv-$(FFCV)
SAMPLE := ../shared/data/imagenet-sample
# One intra-op thread per rank: two ranks on two cores otherwise fight over them.
export OMP_NUM_THREADS ?= 1

.PHONY: setup lint test test-all test-fast test-py312 demo bench bench-gpu clean docker

setup: $(STAMP)

# setup.py says what mimscale needs (ranges); constraints.txt pins the tested versions. A venv of
# another Python is recreated (--clear), not mixed.
$(STAMP): setup.py constraints.txt scripts/system_deps.sh scripts/find_python.sh mimscale/data/_jpeg_region.c mimscale/data/_cv_resize.cpp
	py=$$(bash scripts/find_python.sh $(PYTHON)) && \
	extras=$$(bash scripts/system_deps.sh "$$py" $(FFCV)) && \
	clear=$$([ -x $(PY) ] && [ "$$($(PY) -c 'import sys; print(sys.version_info[:2])')" != "$$("$$py" -c 'import sys; print(sys.version_info[:2])')" ] && echo --clear || true) && \
	"$$py" -m venv $$clear $(VENV) && \
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[$$extras]" && \
	touch $(STAMP)

# ruff (rules in ruff.toml) over everything we write; CI runs it before the tests.
lint: setup
	$(VENV)/bin/ruff check .

# The venv's bin on PATH: DeepSpeed JIT-builds its CPU comm op with the venv's ninja.
# Every module is covered without the tests marked slow (the quality benchmark's smoke run, torch.compile,
# the plain-torch and frozen-extractor benches, the FFCV and WebDataset 2-rank resumes, AMT's and
# AutoMAE-EMA's ZeRO-3 resumes, ZeRO-2 training and resume, block-wise end to end, the ZeRO-3 health
# check, the bf16 config on CPU ranks, the SimMIM launch, the second-job fault, the ZeRO-2 -> 1 elastic
# resume, the bench-step JSON variants, the bench-gpu matrix, the resume of a checkpoint of the pre-packages layout: each drives a module that has unit tests,
# golden curves or another run in make test); test-all runs them too.
test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q --durations=15 -m "not slow" tests

test-all: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q --durations=15 tests

# Unit tests only (no multi-rank launches).
test-fast: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q tests/unit

# Python 3.12 smoke run (CI runs it after make test): the package and a few unit test files under
# 3.12, in .venv-py3.12 built by uv (a [dev] tool) from constraints.txt; uv's download cache makes a
# rebuild take seconds. Skipped, saying so, when no Python 3.12 is found (PY312= names another).
PY312 ?= python3.12
PY312_VENV := .venv-py3.12
PY312_TESTS := tests/unit/test_config.py tests/unit/test_imports.py tests/unit/methods/test_methods.py tests/unit/test_setup.py
test-py312: setup
	@py=$$(bash scripts/find_python.sh $(PY312) 2>/dev/null) || { \
	  echo "make test-py312: skipped: no Python 3.12 found ($(PY312)); install one (pyenv install 3.12) or set PY312=/path/to/python3.12"; \
	  exit 0; }; \
	set -e; \
	"$$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' || { echo "make test-py312: $$py is not Python 3.12" >&2; exit 1; }; \
	echo "make test-py312: $$py"; \
	$(VENV)/bin/uv venv --quiet --allow-existing --python "$$py" $(PY312_VENV); \
	VIRTUAL_ENV=$(CURDIR)/$(PY312_VENV) $(VENV)/bin/uv pip install --quiet -c constraints.txt -e ".[dev]" || { \
	  echo "make test-py312: skipped: installing the pins into $(PY312_VENV) failed (PyPI unreachable?); see the error above" >&2; \
	  exit 0; }; \
	PATH=$(CURDIR)/$(PY312_VENV)/bin:$$PATH $(PY312_VENV)/bin/python -m pytest -q -p no:cacheprovider $(PY312_TESTS)

# SOURCE=folder (default) | wds | ffcv | synthetic; wds/ffcv convert the sample into runs/data first.
SOURCE ?= folder
# METHOD=mae (default) | amt | automae: which tiny preset (mimscale/configs/<METHOD>_vit_tiny_cpu.yaml).
METHOD ?= mae
demo: setup
	bash scripts/demo.sh $(SOURCE) $(SAMPLE) $(METHOD)

bench: setup
	OMP_NUM_THREADS= $(PY) -m mimscale.bench step --method mae --model vit_base --batch 16 --steps 3 --json

# A GPU node's numbers: MAE / AMT / AutoMAE (stored, online) ViT-B/16 bf16 steps, ZeRO-1/2, with and
# without torch.compile, synthetic and FFCV data, and one checkpoint save per model and stage; one
# table and one JSON (benchmarks/gpu.py). FFCV_BETON=<.beton> for the FFCV cases (without it they are
# rows saying so). Lists, comma-separated, when given: MODELS=vit_base,vit_large, BATCHES=128,64 (micro
# batch per GPU; default the preset's), ZERO=1,2,3, GRAD_CKPT=0,1 (model.grad_ckpt: every k-th block).
# benchmarks/gpu_quick.sh: the first rows in 5 minutes on a bare GPU node.
FFCV_BETON ?=
MODELS ?=
BATCHES ?=
ZERO ?=
GRAD_CKPT ?=
bench-gpu: setup
	$(PY) -m benchmarks.gpu $(if $(FFCV_BETON),--ffcv $(FFCV_BETON)) $(if $(MODELS),--models $(MODELS)) $(if $(BATCHES),--batches $(BATCHES)) \
	  $(if $(ZERO),--zero $(ZERO)) $(if $(GRAD_CKPT),--grad-ckpt $(GRAD_CKPT)) --ckpt-save --json-out runs/bench_gpu.json

clean:
	rm -rf runs .pytest_cache

# The cluster image (docker/Dockerfile) as mimscale:<VERSION>, by default `git describe`.
# DOCKER_BUILD_ARGS passes more, e.g. DOCKER_BUILD_ARGS="--build-arg WITH_FFCV=1".
IMAGE_VERSION = $(or $(VERSION),$(shell git describe --tags --always --dirty 2>/dev/null || echo dev))
docker:
	@docker info >/dev/null 2>&1 || { echo "make docker: no Docker daemon answers ('docker info' failed): start one, or build on a machine that has one" >&2; exit 1; }
	docker build -f docker/Dockerfile $(DOCKER_BUILD_ARGS) --build-arg MIMSCALE_VERSION=$(IMAGE_VERSION) -t mimscale:$(IMAGE_VERSION) .
