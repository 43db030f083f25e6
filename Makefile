# Two commands on a fresh machine: `make demo` (set up + tiny pretrain) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the CPU build of torch (an unpinned install would pull a multi-GB CUDA build).
# GPU machines: make TORCH_SPEC="torch" (or keep the machine's torch: make TORCH_SPEC=).
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2

.PHONY: env demo test bench clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: env
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) emu_mc/pretrain.py --config configs/tiny.yaml

test: env
	$(PY) -m pytest tests -q -ra

bench: env
	$(PY) benchmarks/resampler_bench.py
	$(PY) benchmarks/loss_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
