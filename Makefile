# Two commands for a newcomer: `make demo` (main job on built-in defaults) and `make test`.
# Both create .venv with Python 3.11 and install MedSight from this checkout, offline-capable
# except for the package registry. torch is pinned to the CPU build 2.13.0 in pyproject.toml.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.medsight-installed

.PHONY: install demo serve test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medsight demo --out demo-output

serve: $(STAMP)
	$(BIN)/medsight serve --demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-output medsight-out .pytest_cache
