# Each target does its own set-up (a .venv in the repository).
.PHONY: setup train test test-all lint

setup:
	./scripts/setup.sh

train: setup
	.venv/bin/ddpmkit train --out runs/digits

test: setup
	.venv/bin/python -m pytest -q

test-all: setup
	.venv/bin/python -m pytest -q -m "slow or not slow"

lint: setup
	.venv/bin/ruff check src tests benchmarks examples
