# Two commands do everything on a fresh machine (Python >= 3.10, no torch):
#   make demo   -- installs, then runs the workbench's default experiment
#   make test   -- installs, then runs ruff and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The one torch the suite is tested with; never an unpinned torch (override: make TORCH=...).
TORCH  ?= torch==2.13.0

.PHONY: install demo lint test bench gpu-check clean

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

lint: install
	$(BIN)/ruff check .

# Two worker processes by default (the CI machine has 2 cores); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

bench: install
	$(BIN)/matrec bench

# The GPU proof: CUDA tests, then kernels checked and timed (benchmarks/gpu_check.py, docs/kernel.md).
# No install step: a GPU machine's own Python with torch + Triton will do (the venv when there is one).
GPU_PYTHON    ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
GPU_CHECK_OUT ?= benchmarks/results/gpu_check
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) runs .pytest_cache
