# Two entry points: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PIP_CONSTRAINT_FILE ?= constraints-cpu.txt
WORKDIR ?= vlp3d-runs/demo

.PHONY: venv demo test lint clean

$(VENV)/.installed: pyproject.toml $(PIP_CONSTRAINT_FILE)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c $(PIP_CONSTRAINT_FILE) -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/vlp3d demo --workdir $(WORKDIR)

# pytest exits 5 when it selected no test: treat that as a failure, loudly.
test: venv
	$(VENV)/bin/ruff check vlp3d tests benchmarks
	$(VENV)/bin/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) vlp3d-runs
