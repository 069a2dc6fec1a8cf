# p2pfed — `make demo` and `make test` work from a fresh clone: they create .venv when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    := out

.PHONY: install test lint typecheck pytest demo bench clean

$(STAMP): pyproject.toml
	@echo "==> install: .venv with p2pfed and its dependencies (torch, transformers, libp2p, ...;"
	@echo "    a few minutes the first time: pip's progress follows)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check p2pfed gossip tests
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint pytest

# `make demo`: four phases, each says what it does and how long it took; the outputs are listed
# at the end.  Times measured on the 2-core machine are in README.md (quick start).
demo: $(STAMP)
	@echo "==> [1/4] install: .venv is ready"
	@mkdir -p $(OUT)
	@echo "==> [2/4] simulation: 27 nodes of topologies/hierarchical-edu.toml mix for 150 rounds"
	@t=$$(date +%s) && $(BIN)/p2pfed simulate topologies/hierarchical-edu.toml --rounds 150 \
		--seed 1 --json $(OUT)/simulation.json --plot $(OUT)/simulation.png && \
		echo "    [2/4] took $$(( $$(date +%s) - t )) s"
	@echo "==> [3/4] education: the same 27 nodes train three tasks for 40 rounds, then the"
	@echo "    local-only and centralized baselines train for the same rounds (each with its bar)"
	@t=$$(date +%s) && $(BIN)/p2pfed simulate topologies/hierarchical-edu.toml --workload education \
		--quick --seed 1 --json $(OUT)/education.json --plot $(OUT)/education.png && \
		echo "    [3/4] took $$(( $$(date +%s) - t )) s"
	@echo "==> [4/4] local federation: 4 real daemons on 127.0.0.1, 3 rounds after the last join"
	@rm -rf $(OUT)/local-federation
	@t=$$(date +%s) && $(BIN)/p2pfed local-federation --nodes 4 --rounds 3 \
		--base $(OUT)/local-federation --json $(OUT)/local-federation.json && \
		echo "    [4/4] took $$(( $$(date +%s) - t )) s"
	@echo "==> outputs"
	@echo "    $(OUT)/simulation.json, $(OUT)/simulation.png: consensus per component and round"
	@echo "    $(OUT)/education.json, $(OUT)/education.png: accuracy per task and round"
	@echo "        (federated, local only, centralized)"
	@echo "    $(OUT)/local-federation.json: the daemons' status summary"
	@echo "    $(OUT)/local-federation/node-*/daemon.log: each daemon's log (its home: identity,"
	@echo "        p2pfed.toml, ledger; check one with: $(BIN)/p2pfed ledger verify --home DIR)"

bench: $(STAMP)
	mkdir -p $(OUT)
	$(BIN)/p2pfed bench --json $(OUT)/bench.json

clean:
	rm -rf $(VENV) $(OUT) .mypy_cache .ruff_cache .pytest_cache .hypothesis
