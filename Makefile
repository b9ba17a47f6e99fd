# Both entry points create .venv on first use and reuse it afterwards; the
# stamp files re-run the install whenever setup.cfg changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.test-installed: setup.cfg pyproject.toml | $(PY)
	$(PIP) install -q -e ".[test]"
	touch $@

$(VENV)/.demo-installed: setup.cfg pyproject.toml | $(PY)
	$(PIP) install -q -e ".[demo]"
	touch $@

# Three workers, one test file each at a time: most of a test's time is single-threaded
# (tracing, conversion, subprocesses), so the 2-core CI machine runs them side by side.
# On a 2-core Xeon the suite took 20m55s with three workers, 22m39s with two.
# The slowest files start first (tests/conftest.py), not the ones with most tests.
test: $(VENV)/.test-installed
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder tests

demo: $(VENV)/.demo-installed
	$(PY) examples/demo.py

# Not a test: ratios against timm and onnxruntime, written to BENCHMARKS.md.
bench: $(VENV)/.test-installed
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
