# The two commands that matter on a fresh machine:
#   make demo   — set up .venv, fetch MovieLens-100K, train CSMF, build the index, serve on :8000
#   make test   — set up .venv, lint, run the whole test suite (what .ci/run calls)
SHELL := /bin/bash
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
DATA  ?= data/ml-100k
RUN   ?= runs/ml-100k
BUNDLE ?= bundles/ml-100k
INDEX ?= flat
HOST  ?= 127.0.0.1
PORT  ?= 8000
# `make demo` trains a shortened schedule of configs/ml-100k.toml (bench/results/train-scale.md,
# section ML-100K: its wall time and what it costs in quality); FULL=1 trains the full config.
# THREADS=0 uses one torch thread per core (alone ~1.3x faster than 1 on 2 cores; under other
# CPU-heavy jobs several times slower, hence the default 1).
THREADS ?= 1
DEMO_SET ?= --set train.epochs=4 --set train.ar_epochs=2
ifdef FULL
DEMO_SET :=
endif

.PHONY: venv demo data train index serve test lint format clean

venv: $(STAMP)

# torch first, pinned: any other torch pulls gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: venv
	$(BIN)/csmf data ml-100k --out $(DATA)
	$(BIN)/csmf train --config configs/ml-100k.toml --data $(DATA) --out $(RUN) --force \
	    $(DEMO_SET) --set train.threads=$(THREADS)
	$(BIN)/csmf eval --run $(RUN)
	$(BIN)/csmf build-index --run $(RUN) --out $(BUNDLE) --index $(INDEX)
	@echo
	@echo "Serving on http://$(HOST):$(PORT) — in another shell try:"
	@echo "  curl -s -X POST http://$(HOST):$(PORT)/v1/retrieve -H 'content-type: application/json' \\"
	@echo "       -d '{\"user_id\": \"196\", \"k\": 10, \"weights\": {\"exposure\": 1, \"click\": 1.8, \"conversion\": 1.2}}'"
	@echo "Weights playground (sliders, two triplets side by side): http://$(HOST):$(PORT)/playground"
	@echo
	$(BIN)/csmf serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two pytest-xdist workers (the machine CI runs on has 2 cores); a worker takes whole modules,
# and the real-Milvus-server modules share one (tests/fixtures/scheduling.py). PYTEST_ARGS= runs
# the suite serially.
PYTEST_ARGS ?= -n 2 --dist loadscope
test: venv lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
