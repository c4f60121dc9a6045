# Two entry points for a fresh clone: `make demo` and `make test` (README.md).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch this project is developed and tested against. Installed only when no torch
# is present, so an existing CUDA build is never replaced. Override: make test TORCH_SPEC=torch==2.5.1
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev,cache,examples]"

demo: install
	$(PYTHON) -m stoker.cli demo --out stoker-demo

test: install
	$(PYTHON) -m pytest -q

# The benchmark suite (10 to 12 minutes on 2 CPUs; BENCH_ARGS=--quick for 1 to 2): figures in
# docs/performance.md, results in benchmarks/out/results.json.
bench: install
	$(PIP) install --quiet -e ".[bench]"
	$(PYTHON) benchmarks/run.py $(BENCH_ARGS)

lint: install
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks
	$(PYTHON) -m mypy --strict src/stoker
