# Two commands on a fresh machine:  `make demo` (main job) and `make test` (test suite).
# Both create .venv and install the package with torch pinned by constraints.txt, with the
# integration extras (Lightning, transformers, TensorBoard): their tests run for real.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install docs readme-figure clean

$(BIN)/.installed: pyproject.toml constraints.txt
	@echo "==> make install: a virtual environment in $(VENV), then flatness with torch pinned by constraints.txt"
	@echo "==> [1/3] creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [2/3] upgrading pip"
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "==> [3/3] installing flatness, its dependencies (torch, numpy, scipy, scikit-learn, matplotlib) and the extras the tests use (pytest, ruff, Lightning, transformers, TensorBoard): the longest step"
	$(BIN)/python -m pip install --progress-bar off -c constraints.txt -e '.[all,test]'
	@touch $@
	@echo "==> installed: $(BIN)/flatness ($(BIN)/flatness --help)"

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/flatness run breast-cancer-mlp --measures

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

# The lint gates of pyproject.toml's [tool.ruff] (style, pyflakes, isort, bugbear, complexity,
# Google-style docstrings); ruff is in the test extra, pinned by constraints.txt.
lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks examples docs

# The documentation site (docs/README.md): the docs extra, then a clean Sphinx build into
# docs/_build/html with warnings as errors; it executes every example of the gallery.
# SPHINXOPTS='-D plot_gallery=0' skips running the examples (a quick look, not a check).
SPHINXOPTS ?=
DOCS_GENERATED := docs/_build docs/api docs/tasks docs/results docs/auto_examples docs/gen_modules \
	docs/sg_execution_times.rst

$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all,test,docs]'
	touch $@

docs: $(BIN)/.docs-installed
	rm -rf $(DOCS_GENERATED)
	$(BIN)/python -m sphinx -b html -W --keep-going $(SPHINXOPTS) docs docs/_build/html

# The README's figure is figure 1 of the gallery's landscape example (docs/_ext/readme_figure.py
# checks that the example still draws it): refresh the committed copy from a `make docs` build.
README_FIGURE := sphx_glr_plot_04_landscape_001.png

readme-figure:
	test -f docs/auto_examples/images/$(README_FIGURE) || $(MAKE) docs
	cp docs/auto_examples/images/$(README_FIGURE) docs/_static/$(README_FIGURE)

clean:
	rm -rf $(VENV) build src/*.egg-info $(DOCS_GENERATED)
