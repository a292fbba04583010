# `make demo` and `make test` set everything up on a fresh machine; nothing is downloaded at run time
# beyond the Python packages themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1: the vision (timm) and LitGPT (litdata) extras need torchvision,
# and this pair is the one that imports together here. The core alone works with torch>=2.6.
TORCH := torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test
DEMO_DATA := data/gutenberg
DEMO_RUN := runs/demo

.PHONY: setup demo test clean

$(BIN)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

setup: $(BIN)/.installed-$(EXTRAS)

demo: setup
	$(BIN)/phiforge prepare gutenberg --source bundled --out $(DEMO_DATA)
	$(BIN)/phiforge train --config configs/demo-cpu.yaml --set data.dir=$(DEMO_DATA) --set out_dir=$(DEMO_RUN)
	$(BIN)/phiforge generate --checkpoint $(DEMO_RUN) --prompt "It is a truth universally acknowledged" \
		--max-new-tokens 80 --temperature 0.8 --top-k 50 --seed 0

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs data .pytest_cache
