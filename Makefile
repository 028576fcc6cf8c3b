# captionflow: `make run-local` sets up and captions the example photos; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build is enough to test and run locally; GPU workers get a CUDA build (see docker/).
TORCH ?= torch==2.13.0
INPUT ?= examples/dataset.txt
OUTPUT ?= out/examples
CAPTIONER ?= blip
RANKER ?= clip
ARGS ?=

.PHONY: install test lint format run-local demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -c constraints.txt
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: install
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

format: install
	$(PY) -m ruff check --fix src tests
	$(PY) -m ruff format src tests

run-local: install
	$(PY) -m captionflow run --input $(INPUT) --output $(OUTPUT) \
		--captioner $(CAPTIONER) --ranker $(RANKER) $(ARGS)

demo: install
	$(PY) -m captionflow.demo $(INPUT) out/demo $(ARGS)

clean:
	rm -rf out .pytest_cache .ruff_cache
