# make test / make demo work on a fresh machine: they create .venv, install the
# pinned stack, build the extension in place, then run. Stamps keep reruns quick.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The venv's ninja must be on PATH for torch's extension builder.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: setup test demo bench bench-gpu clean

setup: $(VENV)/.built

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest tests benchmarks --benchmark-disable

demo: setup
	$(PY) -m chanflex_kernels.bench --quick

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only

bench-gpu: setup
	$(PY) -m chanflex_kernels.bench_gpu

clean:
	rm -rf build *.egg-info chanflex_kernels/*.so .pytest_cache .benchmarks
