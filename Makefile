# `make demo` and `make test` set everything up on a fresh machine. Nothing is downloaded at run time
# beyond the Python packages themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q --disable-pip-version-check
# torch 2.14.1 + torchvision 0.29.1: the vision (timm) and LitGPT (litdata) extras need torchvision,
# and this pair imports together here. The core alone works with any torch in pyproject's range.
TORCH := torch==2.14.1 torchvision==0.29.1
TEST_EXTRAS := test,vision,tensorboard,litgpt,eval
DEMO_DATA := data/gutenberg
DEMO_RUN := runs/demo

.PHONY: setup setup-test demo test test-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BIN)/.core: $(BIN)/python pyproject.toml
	$(PIP) $(TORCH)
	$(PIP) -e .
	touch $@

$(BIN)/.test: $(BIN)/.core
	$(PIP) $(TORCH) -e ".[$(TEST_EXTRAS)]"
	touch $@

setup: $(BIN)/.core
setup-test: $(BIN)/.test

demo: setup
	$(BIN)/phiforge prepare gutenberg --source bundled --out $(DEMO_DATA)
	$(BIN)/phiforge train --config configs/demo-cpu.yaml --set data.dir=$(DEMO_DATA) --set out_dir=$(DEMO_RUN)
	$(BIN)/phiforge generate --checkpoint $(DEMO_RUN) --prompt "It is a truth universally acknowledged" \
		--max-new-tokens 80 --temperature 0.8 --top-k 50 --seed 0

test: setup-test
	$(BIN)/python -m pytest -q

# the tests that run in one process: about 3 minutes on 2 cores
test-quick: setup-test
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs data .pytest_cache
