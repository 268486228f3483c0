# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo

.PHONY: install demo test bench report lint clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch/torchvision pinned exactly: these machines install them from local disk.
	$(BIN)/python -m pip install --quiet -e ".[edge,dev,attacks,track]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/edgemri demo --out $(DEMO) --track

# Two workers (pytest-xdist), a test file each at a time: its module fixtures (a whole deployment) are built once.
# Many slow tests wait on Flower's processes, so two at a time finish sooner, even on two cores.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all
	$(BIN)/python -m benchmarks.report

# docs/RESULTS.md and the README's results table, from benchmarks/results/*.json
report: $(STAMP)
	$(BIN)/python -m benchmarks.report

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
