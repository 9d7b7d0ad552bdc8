# The course's commands. `make book` and `make test` are all a newcomer needs (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NB     ?= notebooks/*.ipynb
# Same hash seed everywhere a notebook runs (execute step, nbval, tests).
export PYTHONHASHSEED := 0
export TQDM_DISABLE := 1
# The CPU code paths of the reference machine (AVX2) unless the caller sets others (e.g.
# `ATEN_CPU_CAPABILITY=default make test` to check another float path); companion sets the same defaults.
export ATEN_CPU_CAPABILITY ?= avx2
export MKL_CBWR ?= AVX2
export ONEDNN_MAX_CPU_ISA ?= AVX2

.PHONY: help env zoo book test unit nbval book-html browser chromium execute bench compat clean

help:
	@echo "make book      install the pinned environment in .venv and build the HTML book into _build/html"
	@echo "make test      unit tests, notebook hygiene, zoo models, strict nbval over every notebook, book build and check"
	@echo "make browser   build the book and check every page offline in headless Chromium (screenshots: _build/screenshots)"
	@echo "make execute   re-execute notebooks in place (NB=notebooks/00_tiny_models.ipynb for one)"
	@echo "make zoo       train (or load) every zoo model, one timing line each"
	@echo "make compat    unit tests and chapter 00 at the lowest versions pyproject.toml allows (downloads GBs)"
	@echo "make bench     run benchmarks/ (not part of make test)"

# pip's own notices (this machine's pip configuration, version checks) go to a log, not the screen.
$(STAMP): requirements.txt pyproject.toml
	@echo "env: creating $(VENV) and installing the pinned environment (log: $(VENV)/install.log)"
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --disable-pip-version-check --no-input -q -r requirements.txt > $(VENV)/install.log 2>&1 \
		|| (cat $(VENV)/install.log; exit 1)
	@$(PY) -m pip install --disable-pip-version-check --no-input -q --no-deps -e . >> $(VENV)/install.log 2>&1 \
		|| (cat $(VENV)/install.log; exit 1)
	@touch $(STAMP)
	@echo "env: ready"

env: $(STAMP)

# pytest exits 5 when it collects nothing (e.g. no notebook yet): that is not a failure.
unit: $(STAMP)
	$(PY) -m pytest tests -q || [ $$? -eq 5 ]

# Train every zoo model first (a cold cache costs its training here, one timing line per model).
zoo: $(STAMP)
	@echo "zoo: training or loading every model (cache: $${COMPANION_CACHE:-~/.cache/companion})"
	@$(PY) tools/warm_zoo.py

# Strict nbval; training-dependent results are compared within their declared tolerance (conftest.py
# loads tools/nbval_tolerance.py).
nbval: $(STAMP)
	$(PY) -m pytest -q -p no:python --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
		--nbval-cell-timeout=900 notebooks || [ $$? -eq 5 ]

# MathJax from the npm registry, pinned by package.json and package-lock.json, served by the book itself
# (_config.yml: html_static_path, mathjax_path): only what tex-mml-chtml.js loads at run time is copied.
MATHJAX := _build/vendor/mathjax/tex-mml-chtml.js
$(MATHJAX): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	rm -rf _build/vendor/mathjax && mkdir -p _build/vendor/mathjax/output
	cp -r node_modules/mathjax/es5/tex-mml-chtml.js node_modules/mathjax/es5/input node_modules/mathjax/es5/a11y \
		node_modules/mathjax/es5/sre node_modules/mathjax/es5/ui node_modules/mathjax/LICENSE _build/vendor/mathjax/
	cp -r node_modules/mathjax/es5/output/chtml _build/vendor/mathjax/output/

book-html: $(STAMP) $(MATHJAX)
	rm -rf _build/html
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	$(PY) tools/check_book.py _build/html

# Headless Chromium and its driver from Debian's packages (and a Chinese font for the screenshots): installed
# when missing if we are root (CI), otherwise the README's apt line is printed.
CHROMIUM_APT := chromium chromium-driver fonts-wqy-microhei
chromium:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "chromium: apt-get install -y $(CHROMIUM_APT)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CHROMIUM_APT) >/dev/null; \
	else echo "chromium: not found; install it with: sudo apt-get install -y $(CHROMIUM_APT)"; exit 1; fi

# The built book in a real browser with the network cut off (tools/check_browser.py).
browser: book-html chromium
	$(PY) tools/check_browser.py _build/html

book: book-html
	@echo "Open the book: file://$(CURDIR)/_build/html/index.html"

test: unit zoo nbval book-html browser
	@echo "make test: all checks passed"

execute: $(STAMP)
	$(PY) tools/execute_notebooks.py $(NB)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf _build

# The lowest versions pyproject.toml allows, in a throwaway venv: unit tests and chapter 00 (downloads GBs).
compat:
	bash tools/compat.sh
