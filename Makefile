# Two commands do everything on a fresh machine (Python >= 3.10, no torch):
#   make demo   -- installs, then runs the workbench's default experiment
#   make test   -- installs, then runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The one torch the suite is tested with; never an unpinned torch (override: make TORCH=...).
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/matrec train

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/matrec bench

clean:
	rm -rf $(VENV) runs .pytest_cache
