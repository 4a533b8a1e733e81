# Two commands on a fresh machine:  `make demo`  then  `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CXR_HOME ?= $(CURDIR)/.cxr
export CXR_HOME

.PHONY: demo test setup ui mlflow-ui viewer bench lint clean device-data

# The venv is rebuilt only when pyproject.toml changes.
$(BIN)/cxr: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The stack pulls several GB of wheels; a dropped connection must not fail a fresh setup,
	# so pip resumes partial downloads and the whole install is retried.
	for attempt in 1 2 3; do \
	  $(BIN)/pip install --quiet --retries 10 --resume-retries 50 -e ".[dev]" && exit 0; \
	  echo "pip install failed (attempt $$attempt of 3), retrying" >&2; sleep 15; \
	done; exit 1
	touch $(BIN)/cxr

setup: $(BIN)/cxr

demo: setup
	$(BIN)/cxr demo

# The floors and the lint first: a back-arrow or a lint error fails before the long suite runs.
# The slowest tests are listed at the end, so the suite's time is watched where it is spent.
# One file's tests run on one worker, so a module's fixture (a trained home, a release job) is
# built once. (xdist's loadgroup did not group under pytest 9: it renames items through an
# attribute pytest 9 no longer reads, so every grouped fixture was built on both workers.)
test: setup
	$(BIN)/ruff check cxr_platform cxr_platform_tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=25 cxr_platform_tests

ui: setup
	DAGSTER_HOME=$(CXR_HOME)/dagster $(BIN)/dagster dev -w workspace.yaml -p 3000

# Runs, metrics, artifacts and the registry (with each version's model card) of the embedded store.
mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CXR_HOME)/mlflow/mlflow.db --port 5000

# OHIF over a running Orthanc (CXR_VIEWER_PACS_URL, default http://127.0.0.1:8042); prints a
# study's URL. Needs nginx and npm.
viewer: setup
	$(BIN)/cxr viewer

bench: setup
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/inference_throughput.py

lint: setup
	$(BIN)/ruff check cxr_platform cxr_platform_tests benchmarks

# The accelerator machine cannot see ../shared: the device tool carries this git-ignored copy.
SHARED_KAGGLE ?= ../shared/data/kaggle-chest-xray-224
device-data:
	mkdir -p .device-data
	cp -r $(SHARED_KAGGLE) .device-data/

clean:
	rm -rf $(CXR_HOME)
