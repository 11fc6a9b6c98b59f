# CPU install path: torch is pinned exactly so pip takes the CPU wheel and never a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: install test test-slow lint run train-tiny bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_PIN)
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check src tests benchmarks

run: install
	$(VENV)/bin/mimo generate --prompt "def fibonacci(n):" --max-tokens 48
	$(VENV)/bin/mimo generate --chat --prompt "add 382 47" --prompt "reverse hello" --prompt "sort 5 3 9 1" \
		--max-tokens 16

bench: install
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) build src/*.egg-info
