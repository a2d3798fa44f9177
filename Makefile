# Bastion's two-command quick start:  `make demo`  and  `make test`.
# Both create .venv if missing, install torch and the package, and the Debian data package
# where apt is available and we are root. Pick another torch build with TORCH=..., e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bastion-installed
PYTEST_ARGS ?=

.PHONY: demo test test-slow setup system-deps bench bench-setup clean help

help:
	@echo "make demo       set up, then run the demo on the embedded data (mnist-5k)"
	@echo "make test       set up, then run the test suite (fast tests; 'make test-slow' for the long ones)"
	@echo "make bench      install the peer libraries (bench extra) and run benchmarks/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

setup: $(STAMP) system-deps

# Debian packages: Fashion-MNIST (full 70,000 images, offline) and a headless Chromium that
# renders the HTML reports in a test. Without them the tests that need them skip.
system-deps:
	@if [ -d /usr/share/datasets/fashion-mnist ] && command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser rendering test will skip"; \
	else echo "note: install dataset-fashion-mnist and chromium (apt-get) for the tests that need them"; fi

demo: setup
	$(BIN)/bastion demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# The peer libraries (torchattacks, ART, foolbox) for side-by-side benchmarks.
bench-setup: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m pip install -q --no-deps torchattacks==3.5.1

bench: bench-setup
	$(BIN)/python benchmarks/attacks.py

clean:
	rm -rf build dist src/*.egg-info .pytest_cache
