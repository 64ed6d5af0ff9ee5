# Two commands for a fresh machine: `make demo` and `make test`. Both install what they need.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: install demo test test-fast test-unit test-integration lint typecheck bench model evaluate clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, from the CPU wheel on local disk: never let a dependency pull a CUDA build
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/elbert-stream demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

# everything but the tests marked slow (> ~30 s each: fault injection, Serve deployments, autoscaling)
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration -m integration

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/elbert-stream bench all

model: $(STAMP)
	# --depth-with-encoder: the shipped weights were trained with the depth logits on the encoder's
	# schedule and clip (docs/model.md); drop it to train the authors' way (the default)
	$(BIN)/elbert-stream train --recipe bbc-minilm --depth-with-encoder --out elbert_stream/models/bbc-elbert

evaluate: $(STAMP)
	$(BIN)/elbert-stream evaluate --out bench/results

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
