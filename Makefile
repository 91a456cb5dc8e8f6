# kvlab: two commands do everything on a fresh machine.
#   make demo   — create .venv, install kvlab, fetch SmolLM2-135M, run the demo (table + figure)
#   make test   — the same set-up plus the models the tests use, then the whole test suite
#
# torch: this machine has a local CPU wheel of torch 2.13.0; any other torch spec pulls multi-GB CUDA
# builds here. On a GPU machine install your own torch first, or run `make TORCH_SPEC=torch test`.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= test,ray
STAMP      := $(VENV)/.kvlab-$(shell echo '$(TORCH_SPEC) $(EXTRAS)' | cksum | cut -d' ' -f1)
TEST_MODELS ?= smollm2-135m qwen2.5-0.5b gemma3-270m
PYTEST_ARGS ?=

.PHONY: setup demo test models browser bench gpu-wheels gpu-check clean help

help:
	@echo "make demo | make test | make bench | make gpu-wheels | make gpu-check | make kvpress-env | make clean"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

setup: $(STAMP)

models: $(STAMP)
	$(BIN)/kvlab models pull $(TEST_MODELS)

# Headless Chromium for the HTML report test (Debian package; skipped with a message where it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not installed: the HTML browser test will be skipped"

demo: $(STAMP)
	$(BIN)/kvlab models pull smollm2-135m
	$(BIN)/kvlab demo

test: $(STAMP) models browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_decode.py

# The GPU check (bench/gpu_check.py) on a machine without network: `make gpu-wheels` here fetches the wheels
# kvlab needs beyond torch (transformers 5.23 and its pure-Python dependencies) into .gpu-wheels/; carry that
# folder to the GPU machine, where `make gpu-check` installs them offline over its own torch and runs the check.
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= 3.11
GPU_OUT    ?= $(if $(OUT),$(OUT),runs/gpu-check)
gpu-wheels:
	$(PYTHON) -m pip download --quiet --only-binary=:all: --python-version $(GPU_PYTHON) -d $(GPU_WHEELS) \
	  "transformers==5.23.0" "huggingface-hub>=1.0,<2" tokenizers safetensors pyyaml regex tqdm packaging \
	  filelock fsspec typer-slim hf-xet numpy

gpu-check:  # kvlab itself runs from this checkout (the script puts it on sys.path): only torch + transformers
	$(PYTHON) -m pip install --quiet --no-index --find-links $(GPU_WHEELS) "transformers==5.23.0"
	$(PYTHON) bench/gpu_check.py --out $(GPU_OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

-include Makefile.kvpress
