# Two commands on a fresh machine: `make demo` (set up + tiny pretrain) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the CPU build of torch (an unpinned install would pull a multi-GB CUDA build).
# GPU machines: make TORCH_SPEC="torch" (or keep the machine's torch: make TORCH_SPEC=).
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2

.PHONY: env demo test bench gpu-kit clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

DEMO := runs/tiny
demo: env
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) emu_mc/pretrain.py --config configs/tiny.yaml
	@# what the tiny model writes and draws (noise: it is tiny and random, but the whole path runs)
	$(PY) -m emu_mc.inference.tiny_decoder $(DEMO)/tiny_decoder --config configs/tiny.yaml
	tar -xf data/sample/image_text/laion-000000.tar -C $(DEMO) chelsea.jpg
	$(PY) -m emu_mc.generate --checkpoint $(DEMO) --image $(DEMO)/chelsea.jpg --prompt "a photo of" \
		--num-beams 5 --length-penalty 0 --max-new-tokens 20 --out $(DEMO)/generated/caption.jsonl
	$(PY) -m emu_mc.generate --checkpoint $(DEMO) --mode image --prompt "a cat sitting on a wooden table" \
		--decoder $(DEMO)/tiny_decoder --steps 10 --out $(DEMO)/generated/image.jsonl

test: env
	$(PY) -m pytest tests -q -ra

bench: env
	$(PY) benchmarks/resampler_bench.py
	$(PY) benchmarks/loss_bench.py

# Wheels a lent GPU machine (Python 3.12, torch + triton preinstalled, no network) lacks, pinned to what CI
# tests, into .whl/ (ignored); benchmarks/gpu_checks.sh installs them there. Needs internet (here).
GPU_KIT = megatron-core==0.16.1 webdataset==1.0.2 braceexpand==0.1.7 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
gpu-kit:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_KIT)
	@ls .whl/*.whl && echo "gpu kit: $$(du -ch .whl/*.whl | tail -1 | cut -f1) in .whl/ (the tree that travels must stay under 64 MiB)"

clean:
	rm -rf $(VENV) runs .pytest_cache
