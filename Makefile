# kubetune developer commands. Everything runs from the project's virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help venv tools images test test-unit test-cluster test-trainer test-node bench-smoke lint typecheck check dev-cluster-up dev-cluster-down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# torch first: DeepSpeed ships as a source package whose build needs torch importable, so
# the rest installs without build isolation (DS_BUILD_OPS=0: its C++ ops JIT-compile on use).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip setuptools wheel
	$(VENV)/bin/pip install 'torch>=2.4'
	DS_BUILD_OPS=0 $(VENV)/bin/pip install --no-build-isolation -e '.[dev,trainer]'
	touch $@

venv: $(VENV)/.installed ## create .venv and install kubetune with its dev and trainer extras

tools: ## build the control plane, kwok, helm, prometheus, the node's parts, Kueue and SeaweedFS from Go modules (idempotent)
	tools/build.sh

images: ## build the base, pause, operator and trainer images with buildah (cached by content)
	tools/images.sh

test: venv ## the whole suite: lint, types, unit, cluster and trainer tiers (needs `make tools`)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: venv ## unit tier only (no cluster, no torch)
	$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)

test-cluster: venv ## cluster tier only (real local control plane)
	$(VENV)/bin/pytest -m cluster $(PYTEST_ARGS)

test-node: venv ## node tier only (a real kubelet node running the built images; needs root, `make tools`)
	$(VENV)/bin/pytest -m node $(PYTEST_ARGS)

test-trainer: venv ## trainer tier only (real CPU training of tiny models)
	$(VENV)/bin/pytest -m trainer $(PYTEST_ARGS)

bench-smoke: venv ## run every benchmark in its smoke size (proves they run; figures not recorded)
	@set -e; for b in bench/[a-z]*.py; do \
	  case $$b in bench/gpu.py|bench/memory_accuracy.py) continue;; esac; \
	  echo "::: $$b --smoke"; $(PY) $$b --smoke; done
	@# The GPU script's own steps in smoke sizes: gpu.py, the gpu test tier, memory_accuracy.py.
	@echo "::: bench/device.sh (DRY: CPU smoke sizes)"
	DRY=1 PY=$(PY) OUT=$${TMPDIR:-/tmp}/kubetune-device-dry bash bench/device.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy

dev-cluster-up: venv ## start the local cluster (kubetune dev-cluster up)
	$(VENV)/bin/kubetune dev-cluster up

dev-cluster-down: venv ## stop it
	$(VENV)/bin/kubetune dev-cluster down
