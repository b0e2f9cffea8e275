# Two commands do everything on a fresh machine (see README):
#   make demo   set up .venv, prepare the Europarl sample, run the tiny demo
#   make test   set up .venv, run the test suite (what CI runs)
#   make test-fast  the same without the tests marked slow (training, data preparation,
#               notebooks, compiling, the browser, the GCP script): the edit-test loop
# Offline machines: the demo and tests read Europarl from EUROPARL_SOURCE, which defaults
# to ../shared/europarl when that folder exists (else the official archives are downloaded).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED := $(abspath $(CURDIR)/../shared)
EUROPARL_SOURCE ?= $(if $(wildcard $(SHARED)/europarl/raw),$(SHARED)/europarl,)
MULTISIMLEX_SOURCE ?= $(if $(wildcard $(SHARED)/multisimlex),$(SHARED)/multisimlex,)
export EUROPARL_SOURCE MULTISIMLEX_SOURCE

.PHONY: demo test test-fast setup clean
demo: $(STAMP)
	$(PY) -m backpack_nb.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

setup: $(STAMP)

# CPU torch 2.13.0 (local wheel, seconds) where there is no NVIDIA driver; on a GPU box the
# default CUDA build. Installing torch first means the package's unpinned `torch` adds nothing.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "backpack-nb needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	    echo "NVIDIA GPU found: installing the CUDA build of torch"; \
	    $(PY) -m pip install --quiet torch; \
	else \
	    echo "no NVIDIA GPU: installing the CPU build torch==2.13.0"; \
	    $(PY) -m pip install --quiet torch==2.13.0; \
	fi
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .cache
