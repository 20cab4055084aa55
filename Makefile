# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-slow style quality clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]" --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest tests -q -m slow

style: $(STAMP)
	$(BIN)/ruff format optimum_prune tests benchmarks examples optimum
	$(BIN)/ruff check --fix optimum_prune tests benchmarks examples optimum

quality: $(STAMP)
	$(BIN)/ruff format --check optimum_prune tests benchmarks examples optimum
	$(BIN)/ruff check optimum_prune tests benchmarks examples optimum

clean:
	rm -rf $(VENV) build *.egg-info
