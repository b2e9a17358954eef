# The README's two commands: `make demo` (main job) and `make test` (test suite).
# Each one creates/updates the virtualenv first; that step is a no-op when nothing changed.
PYTHON ?= python3
VENV ?= .venv
# PyPI's torchvision does not import beside the torch 2.13.0 CPU build, and timm needs torchvision.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qformer-installed
PYTEST_ARGS ?=
# Two pytest-xdist workers, whole files each (module fixtures run once): one test's waits for Ray, a server or
# a subprocess leave a core idle that the other worker's tests use. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: venv demo ui test test-fast bench clean-venv

venv:
	@want="$(TORCH_SPEC) | $$(sha1sum pyproject.toml | cut -c1-12)"; \
	if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$$want" ] && [ -x $(PY) ]; then exit 0; fi; \
	set -e; \
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip; \
	$(PY) -m pip install -q $(TORCH_SPEC); \
	$(PY) -m pip install -q -e '.[test]'; \
	echo "$$want" > $(STAMP)

demo: venv
	$(VENV)/bin/qformer demo

ui: venv
	$(VENV)/bin/qformer ui

test: venv
	@VENV=$(VENV) bash platform/ci/ensure_compose.sh
	@bash platform/ci/ensure_chromium.sh
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The unit layer alone (no Ray, no end-to-end runs): what to run while changing code.
test-fast: venv
	$(PY) -m pytest $(XDIST) -m "not e2e" $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/qformer bench all

clean-venv:
	rm -rf $(VENV)
