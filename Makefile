# `make demo` and `make test` set everything up on a fresh machine. Nothing is downloaded at run time
# beyond the Python packages themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q --disable-pip-version-check
# torch 2.14.1 + torchvision 0.29.1: the vision (timm) and LitGPT (litdata) extras need torchvision,
# and this pair imports together here. The core alone works with any torch in pyproject's range.
TORCH := torch==2.14.1 torchvision==0.29.1
TEST_EXTRAS := test,vision,tensorboard,litgpt,eval,data,float8
DEMO_TOKENIZER := data/tokenizer-4k
DEMO_DATA := data/gutenberg-4k
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

# the demo: a 4,096-token BPE trained on the bundled books, the books prepared with it, the `small` body trained
# with Muon (configs/demo-cpu.yaml; runs/demo is started over each time), bits per byte of the held-out book, a sample
demo: setup
	$(BIN)/phiforge tokenizer train --source bundled --vocab-size 4096 --out $(DEMO_TOKENIZER)
	$(BIN)/phiforge prepare gutenberg --source bundled --tokenizer-dir $(DEMO_TOKENIZER) --out $(DEMO_DATA)
	$(BIN)/phiforge train --config configs/demo-cpu.yaml --set data.dir=$(DEMO_DATA) --set out_dir=$(DEMO_RUN) \
		--overwrite
	$(BIN)/phiforge eval --checkpoint $(DEMO_RUN) --data $(DEMO_DATA) --split val
	$(BIN)/phiforge generate --checkpoint $(DEMO_RUN) --prompt "It is a truth universally acknowledged" \
		--max-new-tokens 80 --temperature 0.8 --top-k 50 --seed 0

# two pytest workers: most tests are one process that leaves the second core idle (29 min -> 21 min on 2 cores)
TEST_WORKERS ?= 2
test: setup-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# the tests that run in one process: about 3 minutes on 2 cores
test-quick: setup-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

clean:
	rm -rf $(VENV) runs data .pytest_cache
