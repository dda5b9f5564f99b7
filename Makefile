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

.PHONY: demo test test-e2e lint install clean report-screenshot

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
	$(BIN)/fedtune simulate --sites 3 --rounds 12 --model $(WORK)/tiny-model --data $(WORK)/data --out $(RUN)
	$(BIN)/fedtune audit verify $(RUN)/ledgers/*.jsonl --receipts $(RUN)
	$(BIN)/fedtune audit report $(RUN) --out $(RUN)/report.html
	@echo "privacy report: $(CURDIR)/$(RUN)/report.html"

# the default suite: everything below full federated runs (about 7 min on CI's 2 cores)
test: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

# the end-to-end federations (simulation, deployment, faults, SecAgg+; about 10 min); CI runs both
test-e2e: $(STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common privacy client server embedded fedtune tests bench
	$(BIN)/lint-imports

# Renders the audit report in headless Chromium (Debian package; not needed by `make test`).
report-screenshot: $(STAMP)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	FEDTUNE_REPORT_SCREENSHOT=$(CURDIR)/runs/report.png $(BIN)/pytest -q tests/e2e/test_audit_report.py

clean:
	rm -rf $(WORK) runs
