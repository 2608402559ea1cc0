# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build from this machine's disk; GPU users: TORCH_PIN="torch==2.11.0" (a CUDA build from
# the registry), or VENV_FLAGS=--system-site-packages TORCH_PIN= to reuse an installed torch.
TORCH_PIN ?= torch==2.13.0
VENV_FLAGS ?=
STAMP := $(VENV)/.fastdd-installed

.PHONY: venv demo test test-gpu bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(strip $(TORCH_PIN)),$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_PIN)")
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test,demo]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python -m fastdd.demo --out results

test: venv
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q bench --benchmark-disable -p no:cacheprovider

bench: venv
	$(BIN)/python -m pytest -q bench --benchmark-only --benchmark-autosave
	$(BIN)/python bench/bench_per_sample.py --out results/bench_per_sample.md
	$(BIN)/python bench/bench_pruning.py --out results/bench_pruning.md
	$(BIN)/python bench/bench_valuation.py --out results/bench_valuation.md
	$(BIN)/python bench/bench_distill.py --steady-malloc --out results/bench_distill.md

clean:
	rm -rf $(VENV) results .pytest_cache .benchmarks
