# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup extras demo test test-fast bench clean fastbpe data

setup:
	@VENV=$(VENV) scripts/setup_env.sh

demo: setup
	@VENV=$(VENV) scripts/demo.sh

# The test suite covers the fastBPE backend and the optional integrations (transformers, lm-eval, peft,
# triton) too, so its set-up builds fastBPE (about 25 s, once) and installs those extras (once).
test: fastbpe extras
	$(PY) -m pytest -q tests

# The quick subset while working: skips the tests marked slow (multi-process and end-to-end CLI runs).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) bench/memory_layer.py

clean:
	rm -rf $(VENV) runs build *.egg-info

# The optional extras the test suite covers (setup.cfg: hf, lmeval, lora, triton).
extras: setup
	@VENV=$(VENV) EXTRAS=dev,hf,lmeval,lora,triton scripts/setup_env.sh

# fastBPE (optional BPE backend; about 25 s to build). Its tests skip, saying so, without it.
fastbpe: setup
	@VENV=$(VENV) scripts/install_fastbpe.sh

# The default corpus, BBC News, prepared into data/bbc_news.
data: setup
	@VENV=$(VENV) scripts/prepare_data.sh
