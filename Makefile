# Everything runs inside .venv, made on first use from the project's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per set of extras, remade when pyproject.toml changes.
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $@ $(VENV)/.demo

install: $(VENV)/.test

test: $(VENV)/.test
	$(BIN)/python -m pytest -q -ra

lint: $(VENV)/.test
	$(BIN)/ruff check src tests examples bench
	$(BIN)/mypy

# @: the demo's --json output goes to stdout alone, so it can be piped.
demo: $(VENV)/.demo
	@$(BIN)/kubeque demo $(ARGS)

bench: $(VENV)/.test
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache demo-output
