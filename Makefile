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

# llama.cpp (through llama-cpp-python, compiled from source) runs the GGUF exports: a third environment with only the
# runtime. The library is built once (target `llama` only, CMAKE_BUILD_PARALLEL_LEVEL=2 by default) and cached in
# .venv-gguf/build; the Python bindings are installed without building anything and load it via LLAMA_CPP_LIB_PATH.
GGUF_VENV := .venv-gguf
GGUF_BIN := $(GGUF_VENV)/bin
LLAMA_CPP_PYTHON_VERSION := 0.3.36
GGUF_SRC := $(GGUF_VENV)/src
GGUF_LIB := $(GGUF_VENV)/build/bin
GGUF_STAMP := $(GGUF_VENV)/.installed
CMAKE_BUILD_PARALLEL_LEVEL ?= 2
export CMAKE_BUILD_PARALLEL_LEVEL

.PHONY: install install-compat install-gguf demo test test-slow test-compat test-gguf style quality clean

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
	$(COMPAT_BIN)/pip install --quiet $(COMPAT_PINS) -e ".[gguf]" pytest datasets --config-settings editable_mode=compat
	$(COMPAT_BIN)/python -c "import transformers; assert transformers.__version__ == '4.57.6', transformers.__version__"
	touch $(COMPAT_STAMP)

install-compat: $(COMPAT_STAMP)

$(GGUF_LIB)/libllama.so:
	test -x $(GGUF_BIN)/python || $(PYTHON) -m venv $(GGUF_VENV)
	mkdir -p $(GGUF_VENV)/cache $(GGUF_SRC)
	test -f $(GGUF_VENV)/cache/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz || $(GGUF_BIN)/pip download \
		--quiet --no-deps --no-binary :all: -d $(GGUF_VENV)/cache llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	tar xzf $(GGUF_VENV)/cache/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz -C $(GGUF_SRC) --strip-components=1
	cmake -S $(GGUF_SRC)/vendor/llama.cpp -B $(GGUF_VENV)/build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
		-DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
	cmake --build $(GGUF_VENV)/build --target llama

$(GGUF_STAMP): $(GGUF_LIB)/libllama.so
	$(GGUF_BIN)/pip install --quiet --upgrade pip
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(GGUF_BIN)/pip install --quiet $(GGUF_SRC)
	touch $(GGUF_STAMP)

install-gguf: $(GGUF_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest tests -q -m slow

# Transformers 4.57 + optimum-onnx: pruning, 5.x checkpoints loading under 4.57 (written by .venv), ONNX export, ORT.
test-compat: $(COMPAT_STAMP) $(STAMP)
	OPTIMUM_PRUNE_MAIN_PYTHON=$(abspath $(BIN)/python) $(COMPAT_BIN)/python -m pytest tests -q -m compat

# The `gguf` tests run in .venv (Transformers' logits) and start .venv-gguf's Python for llama.cpp's.
test-gguf: $(GGUF_STAMP) $(STAMP)
	LLAMA_CPP_PYTHON=$(abspath $(GGUF_BIN)/python) LLAMA_CPP_LIB_PATH=$(abspath $(GGUF_LIB)) \
		$(BIN)/python -m pytest tests -q -m gguf

style: $(STAMP)
	$(BIN)/ruff format optimum_prune tests benchmarks examples optimum
	$(BIN)/ruff check --fix optimum_prune tests benchmarks examples optimum

quality: $(STAMP)
	$(BIN)/ruff format --check optimum_prune tests benchmarks examples optimum
	$(BIN)/ruff check optimum_prune tests benchmarks examples optimum

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(GGUF_VENV) build *.egg-info
