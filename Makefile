# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The Optimum/ONNX path needs a second environment: optimum-onnx 0.1.0 requires transformers<4.58.
COMPAT_VENV := .venv-compat
COMPAT_BIN := $(COMPAT_VENV)/bin
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_PINS := torch==2.13.0 transformers==4.57.6 "optimum-onnx[onnxruntime]==0.1.0"

.PHONY: install install-compat demo test test-slow test-compat style quality clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]" --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

# The pins go in the same `pip install` as the package so that the resolver keeps transformers at 4.57.6 (alone,
# `datasets` would pull huggingface_hub>=1 and with it transformers 5).
$(COMPAT_STAMP): pyproject.toml
	test -x $(COMPAT_BIN)/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_BIN)/pip install --quiet --upgrade pip
	$(COMPAT_BIN)/pip install --quiet torch==2.13.0
	$(COMPAT_BIN)/pip install --quiet $(COMPAT_PINS) -e . pytest datasets --config-settings editable_mode=compat
	$(COMPAT_BIN)/python -c "import transformers; assert transformers.__version__ == '4.57.6', transformers.__version__"
	touch $(COMPAT_STAMP)

install-compat: $(COMPAT_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest tests -q -m slow

# Transformers 4.57 + optimum-onnx: pruning, 5.x checkpoints loading under 4.57 (written by .venv), ONNX export, ORT.
test-compat: $(COMPAT_STAMP) $(STAMP)
	OPTIMUM_PRUNE_MAIN_PYTHON=$(abspath $(BIN)/python) $(COMPAT_BIN)/python -m pytest tests -q -m compat

style: $(STAMP)
	$(BIN)/ruff format optimum_prune tests benchmarks examples optimum
	$(BIN)/ruff check --fix optimum_prune tests benchmarks examples optimum

quality: $(STAMP)
	$(BIN)/ruff format --check optimum_prune tests benchmarks examples optimum
	$(BIN)/ruff check optimum_prune tests benchmarks examples optimum

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info
