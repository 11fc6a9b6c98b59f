# CPU install path: torch is pinned exactly so pip takes the CPU wheel and never a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: install browser test test-slow lint run train-tiny bench clean

# runtime dependencies only (what `make run` needs); the test tools come on top with `make install` / `make test`
$(VENV)/.runtime: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e . $(TORCH_PIN)
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_PIN)
	touch $@

install: $(VENV)/.installed

# the web page's test drives the system Chromium; as root, install it when it is missing
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && \
		apt-get update -q && apt-get install -y -q chromium chromium-driver || true; }

test: install browser
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check src tests benchmarks

HOST ?= 127.0.0.1
PORT ?= 8000

# serves the bundled default model: the chat page at http://$(HOST):$(PORT)/, the OpenAI and Anthropic APIs
run: $(VENV)/.runtime
	$(VENV)/bin/mimo serve --host $(HOST) --port $(PORT)

bench: install
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) build src/*.egg-info
