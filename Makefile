PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-slow lint bench clean chromium

# headless Chromium renders the analysis report in the tests (Debian package `chromium`)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,demo]" $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rankwise demo --out demo_out

chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium)

test: $(STAMP) chromium lint
	$(BIN)/python -m pytest -q -x tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -x -m slow tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/adapters.py

clean:
	rm -rf $(VENV) demo_out build *.egg-info
