# fedtune -- the two set-up commands are `make demo` and `make test`.
# torch is installed FIRST and pinned: otherwise pip resolves a multi-GB CUDA build.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedtune-installed
WORK   := .fedtune
RUN    ?= runs/demo

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS :=
export FLWR_HOME := $(CURDIR)/$(WORK)/flwr-home
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_USAGE_STATS_ENABLED := 0
export FEDTUNE_CACHE := $(CURDIR)/$(WORK)/cache

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(WORK)/tiny-model/config.json: | $(STAMP)
	$(BIN)/fedtune model tiny --out $(WORK)/tiny-model

$(WORK)/data/.complete: | $(STAMP)
	$(BIN)/fedtune data synth --sites 3 --out $(WORK)/data
	touch $@

demo: $(STAMP) $(WORK)/tiny-model/config.json $(WORK)/data/.complete
	rm -rf $(RUN)
	$(BIN)/fedtune simulate --sites 3 --rounds 3 --model $(WORK)/tiny-model --data $(WORK)/data --out $(RUN)

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common privacy client server fedtune

clean:
	rm -rf $(WORK) runs
