# p2pfed — `make demo` and `make test` work from a fresh clone: they create .venv when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    := out

.PHONY: install test lint typecheck pytest demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check p2pfed gossip tests
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint pytest

demo: $(STAMP)
	mkdir -p $(OUT)
	$(BIN)/p2pfed simulate topologies/hierarchical-edu.toml --rounds 150 --seed 1 \
		--json $(OUT)/simulation.json --plot $(OUT)/simulation.png
	$(BIN)/p2pfed simulate topologies/hierarchical-edu.toml --workload education --quick \
		--seed 1 --json $(OUT)/education.json
	$(BIN)/p2pfed local-federation --nodes 4 --rounds 3 --json $(OUT)/local-federation.json

bench: $(STAMP)
	mkdir -p $(OUT)
	$(BIN)/p2pfed bench --json $(OUT)/bench.json

clean:
	rm -rf $(VENV) $(OUT) .mypy_cache .ruff_cache .pytest_cache .hypothesis
