# Two commands on a fresh machine: `make demo` (set up + tiny pretrain) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the CPU build of torch (an unpinned install would pull a multi-GB CUDA build).
# GPU machines: `make demo TORCH_SPEC=` keeps the machine's torch: the venv is then created with
# --system-site-packages, so the torch (and triton) already installed satisfy the requirements and
# pip installs no other. Switching between the two: `make clean` first.
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS := $(if $(TORCH_SPEC),,--system-site-packages)
# Demo processes: one per visible GPU, or 2 gloo ranks on a CPU machine (evaluated once the venv exists).
NPROC ?= $(shell $(PY) -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)

.PHONY: env demo test bench gpu-kit clean

# The stamp records the torch choice: a venv made for the other one is refused, not silently reused.
env: $(VENV)/.installed
	@made="$$(cat $(VENV)/.installed)"; if [ -n "$$made" ] && [ "$$made" != "TORCH_SPEC=$(TORCH_SPEC)" ]; then \
		echo "$(VENV) was made with $$made, not TORCH_SPEC=$(TORCH_SPEC): run make clean first" >&2; exit 2; fi

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	echo "TORCH_SPEC=$(TORCH_SPEC)" > $@

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

# The DALI extra (~1 GB of CUDA libraries) only for the tests, so CI (`.ci/run` = `make test`) runs the
# DALI CPU decoder tests; EMU_MC_EXPECT_DALI makes them fail rather than skip if DALI is missing.
$(VENV)/.dali: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dali]"
	touch $@

test: env $(VENV)/.dali
	EMU_MC_EXPECT_DALI=1 $(PY) -m pytest tests -q -ra

bench: env
	$(PY) benchmarks/resampler_bench.py
	$(PY) benchmarks/loss_bench.py

# Wheels a lent GPU machine (Python 3.12, torch + triton preinstalled, no network) lacks, pinned to what CI
# tests, into .whl/ (ignored); benchmarks/gpu_checks.sh installs them there. Needs internet (here).
GPU_KIT = megatron-core==0.16.1 webdataset==1.0.2 braceexpand==0.1.7 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# decoder-bench's diffusers and what it imports that a bare torch image lacks (numpy, filelock, fsspec,
# packaging, typing-extensions come with torch); huggingface-hub below 2 because the image's transformers requires it
GPU_KIT += diffusers==0.42.1 huggingface-hub==1.33.0 hf-xet==1.8.0 httpx==0.28.1 httpcore==1.0.9 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 \
	anyio==4.16.0 click==8.5.1 lazy-importer==0.1.0 truststore==0.10.5 safetensors==0.8.0 regex==2026.11.19 \
	pillow==13.0.0 requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3 \
	importlib-metadata==10.2.0 zipp==4.1.2 pyyaml==6.0.4 tqdm==4.70.1
gpu-kit:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_KIT)
	@ls .whl/*.whl && echo "gpu kit: $$(du -ch .whl/*.whl | tail -1 | cut -f1) in .whl/ (the tree that travels must stay under 64 MiB)"

clean:
	rm -rf $(VENV) runs .pytest_cache
