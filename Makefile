# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup:
	@VENV=$(VENV) scripts/setup_env.sh

demo: setup
	@VENV=$(VENV) scripts/demo.sh

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/memory_layer.py

clean:
	rm -rf $(VENV) runs build *.egg-info
