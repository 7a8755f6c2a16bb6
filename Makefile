# mimscale: the README's commands.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mimscale-installed
SAMPLE := ../shared/data/imagenet-sample
# One intra-op thread per rank: two ranks on two cores otherwise fight over them.
export OMP_NUM_THREADS ?= 1

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): setup.py
	bash scripts/system_deps.sh $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The venv's bin on PATH: DeepSpeed JIT-builds its CPU comm op with the venv's ninja.
test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q tests

# Unit tests only (no multi-rank launches).
test-fast: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q tests/unit

demo: setup
	rm -rf runs/demo
	@if [ -d $(SAMPLE)/train ]; then data="--set data.source=folder --set data.path=$(SAMPLE)"; \
	  else echo "$(SAMPLE) not found: using synthetic images"; data="--set data.source=synthetic"; fi; \
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu deepspeed --num_gpus 2 mimscale/pretrain.py \
	  --deepspeed_config ds_configs/cpu_fp32_zero1.json --config mimscale/configs/mae_vit_tiny_cpu.yaml \
	  --set output_dir=runs/demo --set resume=never $$data

bench: setup
	OMP_NUM_THREADS= $(PY) -m mimscale.bench step --method mae --model vit_base --batch 16 --steps 3 --json

clean:
	rm -rf runs .pytest_cache
