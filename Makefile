# bonefrac: `make demo` shows it working end to end, `make test` runs every test.
# Both start from a fresh clone with nothing but Python 3.11 and pip.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
IMAGE ?= bonefrac:latest
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | sha1sum | cut -c1-12)
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
# Offline, Prefect's server telemetry is an ERROR line; TensorFlow's C++ INFO/WARNING start-up
# lines say nothing about the run (its ERRORs still print). `bonefrac` sets these too.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TF_CPP_MIN_LOG_LEVEL := 2
# Python writes each module's bytecode on first import, unless PYTHONDONTWRITEBYTECODE is set
# (it is on these machines). uv installs without bytecode, so each process would then compile
# the same sources again: importing TensorFlow, Keras, MLflow, Prefect, NNCF, OpenVINO and
# BentoML took 19.8-22.5 s a process without .pyc files against 7.5-7.8 s with them
# (benchmarks/bytecode.py). The .pyc files go into .venv and __pycache__ folders (git ignores
# them).
unexport PYTHONDONTWRITEBYTECODE
MAKE_START := $(shell date +%s)

.PHONY: setup browser container-tools container serve-lock demo ui test lint clean

setup: $(STAMP)
	@if [ $$(stat -c %Y $(STAMP)) -lt $(MAKE_START) ]; then \
		echo "setup: $(VENV) already installed for this pyproject.toml + requirements.lock, reused"; fi

# requirements.lock pins the whole dependency tree (pip freeze of a known-good install).
# uv installs that set from its warm cache in ~10 s where pip takes ~275 s (docs/benchmarks.md),
# most of a newcomer's first `make demo`. uv reads neither pip.conf nor PIP_* settings: where
# packages come from a site's own index, set UV_DEFAULT_INDEX (uv's docs) or run
# `make setup INSTALLER=pip`; if uv fails, setup says so and installs with pip.
INSTALLER ?= uv
UV_VERSION := 0.13.9
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "bonefrac needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	@if [ "$(INSTALLER)" = uv ] && $(PIP_INSTALL) uv==$(UV_VERSION) && \
		UV_SYSTEM_CERTS=1 $(BIN)/uv pip install --quiet --python $(BIN)/python \
			-c requirements.lock -e '.[test,dask]'; then \
		echo "setup: installed with uv $(UV_VERSION) (system CA certificates)"; \
	else \
		[ "$(INSTALLER)" = uv ] && echo "setup: uv could not install (above); installing with pip"; \
		$(PIP_INSTALL) -c requirements.lock -e '.[test,dask]'; \
	fi
	@rm -f $(VENV)/.installed-*
	@touch $@

# SYNTHETIC data -> the whole retraining flow (quick profile) -> Bento -> the web page.
demo: setup
	@if [ -d data/MURA-v1.1 ]; then \
		echo "demo-data: data/MURA-v1.1 exists, reused (delete it for new synthetic data)"; \
	else $(BIN)/bonefrac demo-data; fi
	$(BIN)/bonefrac --profile quick manifest
	$(BIN)/bonefrac --profile quick pipeline
	$(BIN)/bonefrac --profile quick serve

# The MLflow UI on the project's store (paths.mlflow_db and paths.mlflow_artifacts).
ui: setup
	$(BIN)/bonefrac ui

# Browser tests drive Debian's Chromium headless; install it when missing (needs root/apt).
browser:
	@command -v chromedriver >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The container test and `make container` build images with buildah from a locally made Debian
# base image (debootstrap); install both when missing (needs root/apt).
container-tools:
	@command -v buildah >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq buildah debootstrap >/dev/null; }

# The Bento's OCI image (bonefrac:latest in containers-storage) from `bonefrac:latest` in the
# BentoML model store (`make demo` puts it there). README "Scaling out and deploying".
container: setup container-tools
	BIN=$(BIN) deploy/container.sh $(IMAGE)

# The Bento's serving-only requirements, resolved against requirements.lock (needs the index).
serve-lock: setup
	$(BIN)/python deploy/serving_lock.py

# Two pytest-xdist workers, the groups in collection order (the flow's tests, the longest, first;
# tests/conftest.py says how the tests are grouped); TEST_WORKERS=0 runs all in one process.
TEST_WORKERS ?= 2
test: setup browser container-tools
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

lint: setup
	$(BIN)/ruff check src tests flows benchmarks
	$(BIN)/ruff format --check src tests flows benchmarks

clean:
	rm -rf artifacts .pytest_cache
