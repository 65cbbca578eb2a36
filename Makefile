# Two commands set up a fresh machine: `make demo` and `make test`; `make test-fast` is the edit loop.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint format models clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch (a plain `torch` would pull a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Ray Data (the optional `ray` extra), so the tests run `--engine ray` on a local Ray instance;
	# where it cannot install, those tests are skipped with the reason.
	$(BIN)/pip install -q -e '.[ray]' || echo "ray extra not installed: the --engine ray tests will be skipped"
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/dsarag models pull

demo: models
	$(BIN)/dsarag ingest corpora/demo/docs --store .dsarag/demo
	$(BIN)/dsarag ask "Who is the privacy officer of Lumen Harbor Cooperative?" --docs corpora/demo/docs --store .dsarag/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything (CI): the 0.5B model end to end, crash trials, fuzzing, Ray, the Triton interpreter.
test: models lint
	$(BIN)/python -m pytest -q -x --durations=15

# The tests not marked slow: under 3 minutes on 2 cores.
test-fast: models lint
	$(BIN)/python -m pytest -q -x -m "not slow" --durations=5

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .dsarag build dist *.egg-info
