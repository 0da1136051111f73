# bonefrac: `make demo` shows it working end to end, `make test` runs every test.
# Both start from a fresh clone with nothing but Python 3.11 and pip.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | sha1sum | cut -c1-12)
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup browser demo test lint clean

setup: $(STAMP)

# requirements.lock pins the whole dependency tree (pip freeze of a known-good install).
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "bonefrac needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# SYNTHETIC data -> the whole retraining flow (quick profile) -> Bento -> the web page.
demo: setup
	@[ -d data/MURA-v1.1 ] || $(BIN)/bonefrac demo-data
	$(BIN)/bonefrac --profile quick manifest
	$(BIN)/bonefrac --profile quick pipeline
	$(BIN)/bonefrac --profile quick serve

# Browser tests drive Debian's Chromium headless; install it when missing (needs root/apt).
browser:
	@command -v chromedriver >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: setup browser
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests flows benchmarks
	$(BIN)/ruff format --check src tests flows benchmarks

clean:
	rm -rf artifacts .pytest_cache
