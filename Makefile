# dpnet: `make demo` runs the main job on the embedded default, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dpnet-installed

DATASET ?= synth
BACKBONE ?= efficientnet_lite0
REGIONS ?= 500
IMAGE_SIZE ?= 544
STORE ?= zarr
SEED ?= 0
BATCH ?= 0
WORKERS ?= -1
DATA_DIR ?=
WEIGHTS ?=
SKIP_BAD ?=
TEST_FRACTION ?= 0.5

EXTRACT_ARGS = --dataset $(DATASET) --backbone $(BACKBONE) --regions $(REGIONS) --image-size $(IMAGE_SIZE) \
	--store $(STORE) --seed $(SEED) --batch-size $(BATCH) --workers $(WORKERS) --test-fraction $(TEST_FRACTION) \
	$(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(SKIP_BAD),--skip-bad)

.PHONY: setup demo extract test bench clean-cache

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

extract: setup
	$(PY) -m extract $(EXTRACT_ARGS)

demo: setup
	$(PY) -m extract --dataset synth

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_extract.py
