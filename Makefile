# The course's commands. `make book` and `make test` are all a newcomer needs (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NB     ?= notebooks/*.ipynb
# Same hash seed everywhere a notebook runs (execute step, nbval, tests).
export PYTHONHASHSEED := 0
export TQDM_DISABLE := 1
# The CPU code paths of the reference machine (AVX2); companion sets the same defaults on import.
export ATEN_CPU_CAPABILITY := avx2
export MKL_CBWR := AVX2
export ONEDNN_MAX_CPU_ISA := AVX2

.PHONY: help env book test unit hygiene nbval book-html book-check execute bench clean

help:
	@echo "make book      install the pinned environment in .venv and build the HTML book into _build/html"
	@echo "make test      unit tests, notebook hygiene, strict nbval over every notebook, book build and check"
	@echo "make execute   re-execute notebooks in place (NB=notebooks/00_tiny_models.ipynb for one)"
	@echo "make bench     run benchmarks/ (not part of make test)"

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

env: $(STAMP)

# pytest exits 5 when it collects nothing (e.g. no notebook yet): that is not a failure.
unit: $(STAMP)
	$(PY) -m pytest tests -q || [ $$? -eq 5 ]

nbval: $(STAMP)
	$(PY) -m pytest -q -p no:python --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
		--nbval-cell-timeout=900 notebooks || [ $$? -eq 5 ]

book-html: $(STAMP)
	rm -rf _build/html
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	$(PY) tools/check_book.py _build/html

book: book-html
	@echo "Open the book: file://$(CURDIR)/_build/html/index.html"

test: unit nbval book-html
	@echo "make test: all checks passed"

execute: $(STAMP)
	$(PY) tools/execute_notebooks.py $(NB)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf _build
