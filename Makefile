# The README's commands. Each uses the active virtualenv / conda env if one is active,
# otherwise creates .venv here. torch is installed only when it is not importable
# (then torch==2.13.0: a CPU wheel on CPU-only machines, the normal CUDA build elsewhere).
SHELL := /bin/bash
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else ifdef CONDA_PREFIX
PY := $(CONDA_PREFIX)/bin/python
else
PY := .venv/bin/python
endif
TORCH_VERSION ?= 2.13.0
COMMA := ,
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart test test-fast install-dev install-quickstart env

env:
	@if [ ! -x "$(PY)" ]; then python3 -m venv .venv; fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"

install-dev: env
	$(PY) -m pip install -q -e ".[all,dev]"

install-quickstart: env
	$(PY) -m pip install -q -e ".[eval]"

quickstart: install-quickstart
	$(PY) -m train.cli train configs/quickstart.yaml --run-dir runs/quickstart
	@echo "sample (temperature 0.8, top-k 40):"
	@$(PY) -m train.cli generate runs/quickstart --prompt "def " --max-new-tokens 120 --temperature 0.8 --top-k 40
	@echo "lm-eval: held-out perplexity$(if $(wildcard ../shared/data/eval/hellaswag), and 50 HellaSwag items,):"
	@$(PY) -m train.cli eval runs/quickstart --limit 50 $(if $(wildcard ../shared/data/eval/hellaswag),--tasks ablate_val_ppl$(COMMA)ablate_hellaswag --data-dir ../shared/data/eval,--tasks ablate_val_ppl)

test: install-dev
	$(PY) -m pytest tests --durations=25 -q

test-fast: install-dev
	$(PY) -m pytest tests --durations=25 -q -m "not slow"
