# peftlab: `make help` lists the targets.
PYTHON ?= python
VENV ?= .venv
BIN := $(VENV)/bin
# Written after a successful install; older than pyproject.toml (or missing): the next target installs again.
INSTALLED := $(VENV)/.installed
LINTED := src tests run.py $(wildcard benchmarks)
# The offline twitter_complaints copy on these machines; elsewhere the hub copy is used.
SHARED_DATA := $(abspath ../shared/data)
export PEFTLAB_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/twitter_complaints),$(SHARED_DATA))
export HF_HUB_OFFLINE ?= $(if $(PEFTLAB_DATA_DIR),1)
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run validate sweep compare test test-fast lint bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: ## (re)install .venv: peftlab with its test tools (CPU torch); the targets below do it when needed
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,sweep,ray]'
	touch $(INSTALLED)

# Every target that runs something from .venv depends on this: the first one typed after cloning installs.
$(INSTALLED): pyproject.toml
	$(MAKE) --no-print-directory install

run: $(INSTALLED) ## the main command: ZeRO-3 + CPU offload, LoRA, default model (ARGS=... adds overrides)
	$(BIN)/python run.py zero=stage3_cpu peft=lora $(ARGS)

validate: $(INSTALLED) ## check a config, its data and launcher without training (ARGS=... as for run; no weights load)
	$(BIN)/peftlab validate $(ARGS)

sweep: $(INSTALLED) ## a small r x alpha sweep on the tiny model (ARGS=... adds overrides)
	$(BIN)/python run.py -m model=tiny_bert peft.r=4,8,16 peft.lora_alpha=16,32 $(ARGS)

compare: $(INSTALLED) ## compare the newest sweep (or DIRS=...)
	$(BIN)/peftlab compare $(or $(DIRS),$(lastword $(sort $(wildcard multirun/*/*))))

test: $(INSTALLED) lint ## lint, then the whole test suite (real DeepSpeed on the CPU; ~25 min on 2 shared cores)
	$(BIN)/python -m pytest -q

test-fast: $(INSTALLED) ## the tests that train no model
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(INSTALLED) ## ruff check and ruff format --check (the one formatter; `ruff format` applies it)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

bench: $(INSTALLED) ## speed and memory of the guide's comparison on whatever device is here
	$(BIN)/python benchmarks/bench.py $(ARGS)

clean: ## remove outputs/ and multirun/ contents
	rm -rf outputs multirun/*/
