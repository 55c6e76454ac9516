# visitas: every target sets itself up (virtual env + dependencies) on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The production install (make install): no dev tools, not editable, pinned by constraints.txt.
PROD_VENV ?= venv
DEMO_DIR ?= $(CURDIR)/.demo
ROWS   ?= 2000000

.PHONY: demo install run check test test-unit lint bench constraints clean help

help:
	@echo "make demo    - run the whole ETL end to end on throwaway servers (data under $(DEMO_DIR))"
	@echo "make install - production install into $(PROD_VENV)/ (no dev extras, not editable, constraints.txt)"
	@echo "make run     - run today's job with ./luigi.cfg (production; ARGS='--date 2026-11-01')"
	@echo "make check   - preflight: configuration, SFTP, database, SMTP, folders (visitas check)"
	@echo "make test    - run every test (unit + integration against real servers)"
	@echo "make lint    - ruff (pyflakes, pycodestyle, isort, bugbear, pyupgrade) and mypy over visitas/"
	@echo "make bench   - benchmark the pipeline against the floor (ROWS=$(ROWS))"
	@echo "make clean   - remove the virtual env, demo data and caches"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "visitas needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

$(PROD_VENV)/.installed: pyproject.toml constraints.txt $(shell find visitas -name '*.py' -o -name '*.sql')
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "visitas needs Python >= 3.11"'
	$(PYTHON) -m venv $(PROD_VENV)
	$(PROD_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PROD_VENV)/bin/python -m pip install --quiet -c constraints.txt .
	touch $@

install: $(PROD_VENV)/.installed
	@$(PROD_VENV)/bin/visitas --version
demo: $(VENV)/.installed
	$(PY) -m visitas.dev.demo --dir $(DEMO_DIR)

run: $(PROD_VENV)/.installed
	$(PROD_VENV)/bin/visitas run $(ARGS)

check: $(PROD_VENV)/.installed
	$(PROD_VENV)/bin/visitas check

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check visitas
	$(VENV)/bin/mypy

test-unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m visitas.dev.bench --rows $(ROWS) $(BENCH_ARGS)

constraints:
	rm -rf .constraints-venv && $(PYTHON) -m venv .constraints-venv
	.constraints-venv/bin/python -m pip install --quiet .
	{ echo "# Pinned runtime dependencies of visitas (pip constraints), tested by make test and used by"; \
	  echo "# make install / make run / the dev virtual env.  Regenerate with make constraints."; \
	  .constraints-venv/bin/python -m pip freeze --exclude visitas; } > constraints.txt
	rm -rf .constraints-venv

clean:
	rm -rf $(VENV) $(PROD_VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache *.egg-info build .bench
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
