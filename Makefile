# Everything a new user needs, from a fresh clone:
#   make train                     # create .venv from uv.lock, train the default experiment
#   make train ARGS="weighting=uncertainty trainer.max_epochs=10"
#   make test                      # create .venv (with dev tools), run the test suite
# uv is used if it is on PATH; otherwise it is installed into .tools/ with pip.

SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
VENV := .venv
ARGS ?=
# Tests never touch the network: no hub retries, W&B runs offline.
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true

.PHONY: help install install-dev train eval test test-slow test-all lint typecheck format bench clean

help:
	@echo "make train [ARGS='overrides'] | make eval ARGS='ckpt_path=...' | make test | make test-slow"
	@echo "make lint | make typecheck | make format | make bench | make clean"

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv

install: $(UV)
	$(UV) sync --frozen --inexact

install-dev: $(UV)
	$(UV) sync --frozen --inexact --group dev

train: install
	$(VENV)/bin/mtl-train $(ARGS)

eval: install
	$(VENV)/bin/mtl-eval $(ARGS)

test: install-dev
	$(TEST_ENV) $(VENV)/bin/pytest $(ARGS)

test-slow: install-dev
	$(TEST_ENV) $(VENV)/bin/pytest -m slow $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy on src/ (settings in mypy.ini); it reads the installed libraries' types, hence the venv
typecheck: install-dev
	$(VENV)/bin/mypy

format: install-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(TEST_ENV) $(VENV)/bin/python benchmarks/overhead.py $(ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache .mypy_cache logs/*/ wandb
