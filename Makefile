# Two entry points (see README): `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 8000
DEMO   ?= demo_data

.PHONY: install demo test test-slow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Writes the demo datastore of synthetic fundus photographs, starts the server on
# $(HOST):$(PORT) and trains the grader in the background.
demo: $(STAMP)
	$(BIN)/monailabel-dr demo $(DEMO) --serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(DEMO) monailabel_dr/model monailabel_dr/logs monailabel_dr/bin
