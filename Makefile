# The two commands: `make demo` (main job on Fashion-MNIST) and `make test` (the whole suite).
# Both create .venv once and reuse it; the venv is reinstalled only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: demo test data browser-test bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "mcmi_lab needs Python >= 3.10; set PYTHON=python3.x")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

data: $(STAMP)
	$(VENV)/bin/mcmi-lab data
	@# notebooks run in place in JupyterLab are stripped of their outputs when staged (tools/strip_notebooks.py)
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git config filter.strip-notebooks.clean "$(PY) tools/strip_notebooks.py --stdin"; fi

demo: data
	$(VENV)/bin/mcmi-lab run demo --out $(OUT)

test: data
	$(PY) -m pytest -q

browser-test: data
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PY) -m pytest -q -m browser tests/test_browser.py

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs
