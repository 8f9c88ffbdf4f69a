# Set-up is part of every target: a fresh machine needs only python3.11 and this Makefile.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
REALDATA ?= $(or $(PRUNEGRAPH_REALDATA),$(HOME)/.cache/prunegraph-realdata)
FETCH  := ../shared/realdata/fetch.sh

.PHONY: run test lint bench realdata clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build, so nothing later resolves a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

realdata: $(STAMP)
	@if [ -x $(FETCH) ]; then PYTHON=$(BIN)/python PRUNEGRAPH_REALDATA=$(REALDATA) $(FETCH) >/dev/null \
	  || echo "warning: real checkpoints could not be fetched; tests marked 'real' will skip" >&2; \
	else echo "warning: $(FETCH) not found; tests marked 'real' will skip" >&2; fi

# The service on the embedded default (SQLite + local worker processes, data in prunegraph-data/),
# analysing the real MobileNetV2 as a demo job; it prints the URL. PORT=8001 make run for another.
PORT ?= 8000
run: $(STAMP) realdata
	$(BIN)/prunegraph serve --port $(PORT) --demo $(REALDATA)/mobilenet_v2_imagenet.pth

lint: $(STAMP)
	$(BIN)/ruff check graphs service clients prunegraph tests benchmarks
	$(BIN)/ruff format --check graphs service clients prunegraph tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

test: $(STAMP) realdata lint
	PRUNEGRAPH_REALDATA=$(REALDATA) $(BIN)/python -m pytest -q

bench: $(STAMP) realdata
	PRUNEGRAPH_REALDATA=$(REALDATA) $(BIN)/python benchmarks/speed.py --out benchmarks/results-latest.json
	$(BIN)/python benchmarks/planning.py --out benchmarks/planning-latest.json
	PRUNEGRAPH_REALDATA=$(REALDATA) $(BIN)/python benchmarks/service_overhead.py --out benchmarks/service-latest.json
	$(BIN)/python benchmarks/ci.py --out benchmarks/ci-latest.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
