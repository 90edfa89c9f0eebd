# Two commands set up and run everything on a fresh machine:
#   make app    the explorer on the shipped checkpoint (http://127.0.0.1:7860)
#   make test   every test, the browser test included
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: app test install install-dev browser

# The pinned requirements first, then the project itself in editable mode (pyproject.toml: the
# package, so `import vit_core` works from any folder, and the vit-* commands).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Debian's Chromium drives the end-to-end test (Playwright cannot download its own browser here).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev browser

app: install
	$(PY) demo/app.py $(ARGS)

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

# Deploy to a Hugging Face Space: only the files the Space needs (python -m vit_core.cli.space).
.PHONY: space space-dry-run
space: install
	$(PY) -m vit_core.cli.space $(SPACE)

space-dry-run: install
	$(PY) -m vit_core.cli.space $(SPACE) --dry-run
