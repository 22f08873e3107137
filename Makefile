# kubetune developer commands. Everything runs from the project's virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help venv tools test test-unit test-cluster lint typecheck check dev-cluster-up dev-cluster-down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

venv: $(VENV)/.installed ## create .venv and install kubetune with its dev extras

tools: ## build the control plane, kwok, helm and prometheus from Go modules (idempotent)
	tools/build.sh

test: venv ## the whole suite: lint, types, unit and cluster tiers (needs `make tools`)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: venv ## unit tier only (no cluster, no torch)
	$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)

test-cluster: venv ## cluster tier only (real local control plane)
	$(VENV)/bin/pytest -m cluster $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

dev-cluster-up: venv ## start the local cluster (kubetune dev-cluster up)
	$(VENV)/bin/kubetune dev-cluster up

dev-cluster-down: venv ## stop it
	$(VENV)/bin/kubetune dev-cluster down
