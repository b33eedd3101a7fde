# make test / make demo work on a fresh machine: they create .venv, install the
# pinned stack, build the extension in place, then run. Stamps keep reruns quick.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The venv's ninja must be on PATH for torch's extension builder.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: setup test demo bench bench-gpu experiment clean

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

# Task 1's comparison: a static ResNet18 (fewer channels filled), seed 004's v4, seed 001's slicing stem, and
# ours; on synthetic images by default (about 2 minutes), DATA=/path/to/imagenet-mini for the real one.
DATA ?= synthetic
EXPERIMENT_MODELS ?= resnet18 resnet18_v4 slicing_resnet18 flexdy_resnet18 flex_channel_cnn_pooled
EPOCHS ?= 3
experiment: setup
	$(PY) -m models experiment $(foreach m,$(EXPERIMENT_MODELS),--model $(m)) --data $(DATA) --epochs $(EPOCHS) \
		--out runs/experiment-$(notdir $(DATA))

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only

bench-gpu: setup
	$(PY) -m chanflex_kernels.bench_gpu

clean:
	rm -rf build *.egg-info chanflex_kernels/*.so .pytest_cache .benchmarks
