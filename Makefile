# Everything from scratch: `make demo` and `make test` create .venv and install what they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: venv
	$(BIN)/mergewatch demo

test: venv
	$(BIN)/python -m pytest -q -n 2 tests

bench: venv
	$(BIN)/python bench/streaming.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
