# The two entry points of the README: `make run` (a federated run on the synthetic default) and
# `make test`. Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

# Test workers (pytest-xdist): the end-to-end runs spend much of their time waiting (process
# start-up, polls), so 2 workers keep 2 cores busier; 3 were slower here (15.4 vs 14.6 min).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

.PHONY: setup nginx lint run test test-fast docs clean

setup: $(VENV)/.installed

# Plain pip in a venv: it takes torch/torchvision from this machine's local wheel store (see README).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

run: setup
	$(VENV)/bin/fedvideo run $(ARGS)

# Everything, end-to-end launches included (the README's test command; CI runs it).
test: setup nginx lint
	$(PYTEST)

# The edit-test loop: no real launch (SuperLink, Ray, SuperNodes); 3.6 min here.
test-fast: setup lint
	$(PYTEST) -m "not e2e"

# The documentation site (mkdocs.yml, pages in docs/) at http://127.0.0.1:8000, rebuilt on every save;
# nothing is fetched (no web fonts). NO_MKDOCS_2_WARNING silences Material's notice about MkDocs 2.0.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# ruff (configured in pyproject.toml): lint and format are checked before the tests run.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The secure deployment puts nginx (an OS package) in front of the SuperLink; its tests need it.
# Installed where we are root with apt-get (policy-rc.d keeps Debian from starting a system nginx
# on port 80); elsewhere those tests are skipped with the reason.
nginx:
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  made=0; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made=1; }; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx) >/dev/null 2>&1 \
	    || echo "nginx could not be installed: the secure-deployment tests will be skipped"; \
	  [ $$made = 0 ] || rm -f /usr/sbin/policy-rc.d; \
	else echo "nginx is missing (apt-get install nginx, as root): the secure-deployment tests will be skipped"; fi

clean:
	rm -rf .flwr_home .pytest_cache
