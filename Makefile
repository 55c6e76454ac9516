# visitas: every target sets itself up (virtual env + dependencies) on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_DIR ?= $(CURDIR)/.demo
ROWS   ?= 2000000

.PHONY: demo run test test-unit lint bench clean help

help:
	@echo "make demo    - run the whole ETL end to end on throwaway servers (data under $(DEMO_DIR))"
	@echo "make run     - run today's job with ./luigi.cfg (production; ARGS='--date 2026-11-01')"
	@echo "make test    - run every test (unit + integration against real servers)"
	@echo "make lint    - ruff (pyflakes, pycodestyle, isort, bugbear, pyupgrade) and mypy over visitas/"
	@echo "make bench   - benchmark the pipeline against the floor (ROWS=$(ROWS))"
	@echo "make clean   - remove the virtual env, demo data and caches"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "visitas needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m visitas.dev.demo --dir $(DEMO_DIR)

run: $(VENV)/.installed
	mkdir -p logs
	$(VENV)/bin/luigi --module visitas RunAll --local-scheduler $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check visitas
	$(VENV)/bin/mypy

test-unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m visitas.dev.bench --rows $(ROWS) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache *.egg-info build .bench
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
