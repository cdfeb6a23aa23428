# The README's two commands: `make demo` (the main job on the shipped checkpoints) and `make test`.
# Each creates .venv if it is missing. torch is pinned first: 2.13.0 is a CPU build on local disk here, while an
# unpinned torch would pull a CUDA build of several GB.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install demo test lint notebooks bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/villes demo --out out

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q
	$(MAKE) notebooks

# every walkthrough notebook, executed top to bottom (nbmake; a cell that runs past 120 s fails)
notebooks: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=120 --durations=0 notebooks

bench: install
	$(BIN)/python bench/ladder.py
	$(BIN)/python bench/sae.py

clean:
	rm -rf out .pytest_cache
