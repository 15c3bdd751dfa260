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

# Build the corpus and tokenizer from the Python standard library, train the tiny model with 2
# data-parallel workers (both cached once done), evaluate it, plot its loss and generate from it.
quickstart: install $(QS)/tiny/final/config.json
	$(LMFLEET) eval $(QS)/tiny/final --data $(QS)/corpus
	$(LMFLEET) plot $(QS)/tiny
	$(LMFLEET) generate $(QS)/tiny/final "def fibonacci(n):" --max-tokens 48 --temperature 0.7 --seed 0

$(QS)/corpus/manifest.json: | install
	$(LMFLEET) data prepare --source stdlib --out $(QS)/corpus --vocab-size 8192 --val-fraction 0.03

$(QS)/tiny/final/config.json: $(QS)/corpus/manifest.json configs/tiny.toml
	rm -rf $(QS)/tiny
	$(LMFLEET) train configs/tiny.toml --data $(QS)/corpus --out $(QS)/tiny --nproc 2

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
