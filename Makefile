# The two entry points of the README: `make run` (a federated run on the synthetic default) and
# `make test`. Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup run test clean

setup: $(VENV)/.installed

# Plain pip in a venv: it takes torch/torchvision from this machine's local wheel store (see README).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

run: setup
	$(PY) -m fedapp.launch $(ARGS)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf .flwr_home .pytest_cache
