# dpnet: `make demo` runs the main job on the embedded default, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dpnet-installed

# Extraction: an option left empty is not passed, so the config's default (per dataset) applies.
DATASET ?= synth
BACKBONE ?=
REGIONS ?=
IMAGE_SIZE ?=
STORE ?=
SEED ?=
BATCH ?=
WORKERS ?=
DATA_DIR ?=
WEIGHTS ?=
SKIP_BAD ?=
TEST_FRACTION ?=
RANKS ?=
CROP ?=
DENSE ?=
RUNTIME ?=
HYPERCOLUMN ?=
FLIP ?=

EXTRACT_ARGS = --dataset $(DATASET) $(if $(BACKBONE),--backbone $(BACKBONE)) $(if $(REGIONS),--regions $(REGIONS)) \
	$(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(if $(STORE),--store $(STORE)) $(if $(SEED),--seed $(SEED)) \
	$(if $(BATCH),--batch-size $(BATCH)) $(if $(WORKERS),--workers $(WORKERS)) $(if $(TEST_FRACTION),--test-fraction $(TEST_FRACTION)) \
	$(if $(RANKS),--ranks $(RANKS)) $(if $(DATA_DIR),--data-dir "$(DATA_DIR)") $(if $(WEIGHTS),--weights "$(WEIGHTS)") \
	$(if $(SKIP_BAD),--skip-bad) $(if $(CROP),$(if $(filter 0 no,$(CROP)),--no-crop,--crop)) $(if $(DENSE),--dense $(DENSE)) \
	$(if $(RUNTIME),--runtime $(RUNTIME)) $(if $(filter 1 yes,$(HYPERCOLUMN)),--hypercolumn) $(if $(filter 1 yes,$(FLIP)),--flip)

# Training: PRESET=default (measured defaults) or paper; empty values take the preset's, then the default.
CACHE ?=
PRESET ?= default
SCHEDULE ?= default
PATIENCE ?=
Q ?=
EPOCHS ?=
INNER_EPOCHS ?=
LR ?=
LR_STEP ?=
MINIBATCH ?=
CONSTRAINTS ?=
DEVICE ?=
VIEWS ?=
# BACKBONE, REGIONS and IMAGE_SIZE, when given, pick among the dataset's caches (never ignored)
PICK_ARGS = $(if $(BACKBONE),--backbone $(BACKBONE)) $(if $(REGIONS),--regions $(REGIONS)) $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE))
TRAIN_ARGS = $(if $(CACHE),--cache "$(CACHE)",$(if $(filter-out synth,$(DATASET)),--dataset $(DATASET) $(PICK_ARGS))) --preset $(PRESET) --schedule $(SCHEDULE) \
	$(if $(Q),--q $(Q)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(INNER_EPOCHS),--inner-epochs $(INNER_EPOCHS)) \
	$(if $(LR),--lr $(LR)) $(if $(LR_STEP),--lr-step $(LR_STEP)) $(if $(MINIBATCH),--batch-size $(MINIBATCH)) \
	$(if $(CONSTRAINTS),--constraints $(CONSTRAINTS)) $(if $(PATIENCE),--patience $(PATIENCE)) $(if $(DEVICE),--device $(DEVICE)) $(if $(SEED),--seed $(SEED)) $(if $(VIEWS),--views "$(VIEWS)")

# Analysis: RUN= a run folder or name under data/runs (default: the run of CACHE / DATASET / LATEST).
RUN ?=
IMG ?=
BOXES ?=
OUT ?=
DASK ?=
MEASURES ?=
ANALYZE_ARGS = $(if $(RUN),--run "$(RUN)",$(if $(CACHE),--cache "$(CACHE)",$(if $(filter-out synth,$(DATASET)),--dataset $(DATASET) $(PICK_ARGS)))) \
	$(if $(BOXES),--boxes-csv "$(BOXES)") $(if $(DASK),--dask $(DASK))

.PHONY: setup demo extract train ablation report explain test bench

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# the report's browser test renders in chromium; install it where apt-get can (else the test says how)
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
		echo "setup: chromium not installed (the browser test will skip); install it with: sudo apt-get install -y chromium"
	touch $(STAMP)

extract: setup
	$(PY) -m dpnet.extract $(EXTRACT_ARGS)

# RANKS=N trains under torchrun: N processes share each step (gloo on the CPU, NCCL on CUDA)
TRAIN_LAUNCH = $(if $(filter-out 1,$(RANKS)),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(RANKS) -m dpnet.train,$(PY) -m dpnet.train)

train: setup
	$(TRAIN_LAUNCH) $(TRAIN_ARGS)

ablation: setup
	$(PY) -m dpnet.train --ablation $(TRAIN_ARGS)

demo: setup
	$(PY) -m dpnet.extract --dataset synth
	$(PY) -m dpnet.train --cache synth-efficientnet_lite0-r500-s544
	$(PY) -m dpnet.analyze report --cache synth-efficientnet_lite0-r500-s544 --pixel-images 40

report: setup
	$(PY) -m dpnet.analyze report $(ANALYZE_ARGS) $(if $(MEASURES),--measures $(MEASURES))

explain: setup
	$(PY) -m dpnet.analyze explain "$(IMG)" $(ANALYZE_ARGS) $(if $(OUT),--out "$(OUT)")

# the suite in one pytest-xdist worker per core (TEST_JOBS=0: in this process)
TEST_JOBS ?= auto
test: setup
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS))

bench: setup
	$(PY) benchmarks/bench_extract.py
	$(PY) benchmarks/bench_train.py
