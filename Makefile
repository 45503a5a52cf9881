PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,demo]" $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rankwise demo --out demo_out

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -x tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/adapters.py

clean:
	rm -rf $(VENV) demo_out build *.egg-info
