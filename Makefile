# mmrag-lite: two commands do everything.
#   make course   set up .venv and run every notebook headless on the cpu-tiny preset
#   make test     set up .venv and run the test suite (CI runs this through .ci/run)
# Re-running is fast: the install is skipped while pyproject.toml, this file and TORCH_SPEC are unchanged.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmrag-installed
# the torch spec the install used: `make test TORCH_SPEC=...` with another one reinstalls (the file changes only then)
SPEC   := $(VENV)/.torch-spec
# CPU installs pin torch + torchvision: an unpinned torch pulls gigabytes, and torch 2.13.0's CPU wheel cannot
# load PyPI's torchvision, which the Qwen-VL processors need. On Colab, keep Colab's torch (see README).
# A TORCH_SPEC given once is remembered (in $(SPEC)): a later plain `make` keeps that build instead of reinstalling
# this default over it. Give TORCH_SPEC again to change it, or rm -rf .venv for the default.
DEFAULT_TORCH_SPEC := torch==2.14.1 torchvision==0.29.1
TORCH_SPEC ?= $(or $(shell cat $(SPEC) 2>/dev/null),$(DEFAULT_TORCH_SPEC))
PRESET ?= cpu-tiny
# Every other library at the version the tests last passed with (.ci/lock.py writes it; `make lock` after an upgrade).
# `make test LOCK=` lets pip choose the newest releases the floors in pyproject.toml allow.
LOCK ?= .ci/constraints.txt
# e.g. make course COURSE_ARGS="--set evaluation.retrain_ablations=false" (dotted preset overrides for every notebook)
COURSE_ARGS ?=
# Let Python cache the bytecode of what it imports into .venv/ (see the install below).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: course test test-fast lint lock clean-runs help FORCE

help:
	@echo "make course  - install into .venv and run the whole course (notebooks 01-05) on PRESET=$(PRESET)"
	@echo "make test    - install into .venv and run the tests (notebooks included)"
	@echo "make test-fast - the tests without executing the notebooks"
	@echo "make lock    - record the installed versions in .ci/constraints.txt (after make test LOCK= and a green run)"

# A venv whose Python is gone or can no longer import what was installed into it (its base Python was removed or
# upgraded) is made again: left as it is, every re-run would fail the same way.
ifneq ($(wildcard $(VENV)/pyvenv.cfg),)
ifneq ($(shell $(PY) -c 'import pip' >/dev/null 2>&1 && echo ok),ok)
$(info $(VENV) no longer works (its Python was removed or upgraded): making it again)
$(shell rm -rf $(VENV))
endif
endif

# Python 3.11+ first (pip would only refuse the project after the venv exists), and no half-made venv left behind
# (Debian/Ubuntu without python3.X-venv fail midway): a failed first try is repaired by re-running, e.g. with PYTHON=...
$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "mmrag-lite needs Python 3.11+; $(PYTHON) is $$($(PYTHON) -V 2>&1). Try: make $(MAKECMDGOALS) PYTHON=python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  echo "could not make $(VENV) (on Debian/Ubuntu: apt install python$$v-venv)"; exit 1; }

# --no-compile: pip would byte-compile every file of every wheel (thousands in torch and transformers, about a minute
# here); Python compiles what is actually imported, once, on first import. That needs bytecode writes, which some
# machines switch off for every process (PYTHONDONTWRITEBYTECODE): without them each import would recompile.
$(SPEC): FORCE | $(PY)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(STAMP): pyproject.toml Makefile $(SPEC) $(LOCK) | $(PY)
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "$(VENV) was made with Python $$($(PY) -V 2>&1); mmrag-lite needs 3.11+: rm -rf $(VENV) and re-run"; exit 1; }
	$(PY) -m pip install --quiet --no-compile --upgrade pip
	$(PY) -m pip install --quiet --no-compile $(TORCH_SPEC) $(if $(LOCK),-c $(LOCK)) -e ".[notebooks,dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

course: $(STAMP)
	$(PY) -m mmrag_lite course --preset $(PRESET) $(COURSE_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not notebook"

lint: $(STAMP)
	$(PY) -m ruff check

# After changing a dependency (or to move to newer releases: make test LOCK= first), record what passed.
lock: $(STAMP)
	$(PY) .ci/lock.py

clean-runs:
	rm -rf runs
