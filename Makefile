# lmfleet — set-up, quickstart and tests. `make quickstart` and `make test` work on a fresh machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LMFLEET := $(VENV)/bin/lmfleet
# The CPU build on this machine's local wheel store; override for a CUDA machine, e.g. TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
QS := runs/quickstart

.PHONY: install quickstart test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so nothing below can pull a different (multi-GB CUDA) build
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Build the corpus and tokenizer from the Python standard library (cached), make a fresh tiny model,
# and generate from it.
quickstart: install $(QS)/corpus/manifest.json
	$(LMFLEET) init $(QS)/model-init --tokenizer $(QS)/corpus --flavor tiny --seed 0
	$(LMFLEET) info $(QS)/model-init
	$(LMFLEET) generate $(QS)/model-init "def fibonacci(n):" --max-tokens 32 --temperature 0.8 --seed 0

$(QS)/corpus/manifest.json: | install
	$(LMFLEET) data prepare --source stdlib --out $(QS)/corpus --vocab-size 8192

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
