# Each target sets up .venv itself on first use (plain pip + venv; no root needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: sweep test lint bench clean

sweep: $(STAMP)
	$(BIN)/advlab sweep sweeps/quickstart.yaml

test: $(STAMP)
	$(BIN)/ruff check advlab tests benchmarks
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check advlab tests benchmarks
	$(BIN)/ruff format --check advlab tests benchmarks

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "advlab: first run: installing advlab and its dependencies into $(VENV) (a few minutes)"
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) results
