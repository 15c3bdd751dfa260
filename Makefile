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
	@# promtool (Debian's prometheus package) checks the cluster's /metrics and the alert rules in the
	@# tests, and a live Prometheus + Alertmanager page a test's webhook; redis-server is the shared
	@# history store of the recommender's replicas; chromium is the browser the web console's test drives
	@{ command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null \
	   && command -v redis-server >/dev/null && command -v chromium >/dev/null; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager redis-server \
	      chromium >/dev/null; \
	  else echo "note: promtool, prometheus-alertmanager, redis-server or chromium not found (apt-get install" \
	    "prometheus prometheus-alertmanager redis-server chromium as root); their tests skip outside CI"; fi; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so nothing below can pull a different (multi-GB CUDA) build
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Build the corpus and tokenizer from the Python standard library, train the tiny model with 2
# data-parallel workers (both cached once done), evaluate it, plot its loss, generate from it, then
# serve it over the OpenAI API on 127.0.0.1:$(PORT) until Ctrl-C.
PORT ?= 8000
quickstart: install $(QS)/tiny/final/config.json
	$(LMFLEET) eval $(QS)/tiny/final --data $(QS)/corpus
	$(LMFLEET) plot $(QS)/tiny
	$(LMFLEET) generate $(QS)/tiny/final "def fibonacci(n):" --max-tokens 48 --temperature 0.7 --seed 0
	@echo ""
	@echo "Serving the model on http://127.0.0.1:$(PORT)/v1 (Ctrl-C stops it); the web console is at"
	@echo "http://127.0.0.1:$(PORT)/ui. Try, in another shell:"
	@echo "  curl -s 127.0.0.1:$(PORT)/v1/completions -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"model\": \"tiny\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 48}'"
	@echo "  $(PY) -c \"from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:$(PORT)/v1', api_key='-'); \\"
	@echo "      print(c.completions.create(model='tiny', prompt='import os', max_tokens=32).choices[0].text)\""
	@echo "  $(LMFLEET) bench serve --url http://127.0.0.1:$(PORT) --num-prompts 32 --concurrency 8 --token-id-range 100:8000"
	@echo ""
	$(LMFLEET) serve $(QS)/tiny/final --served-model-name tiny --port $(PORT)

$(QS)/corpus/manifest.json: | install
	$(LMFLEET) data prepare --source stdlib --out $(QS)/corpus --vocab-size 8192 --val-fraction 0.03

$(QS)/tiny/final/config.json: $(QS)/corpus/manifest.json configs/tiny.toml
	rm -rf $(QS)/tiny
	$(LMFLEET) train configs/tiny.toml --data $(QS)/corpus --out $(QS)/tiny --nproc 2

test: install
	$(VENV)/bin/ruff check lmfleet tests benchmarks
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
