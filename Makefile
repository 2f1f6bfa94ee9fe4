# podium: `make demo` and `make test` are the two set-up commands (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: demo test bench install dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Re-install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

demo: $(VENV)/.installed
	$(BIN)/podium train experiment=digits

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q --timeout=900 -n auto --dist loadfile  # one process per core; a file stays on one worker (module fixtures)

bench: $(VENV)/.dev-installed
	mkdir -p bench-out
	$(BIN)/python benchmarks/trainer_overhead.py --quick --json bench-out/trainer_overhead.json
	$(BIN)/python benchmarks/landmarks_isbi.py --quick --json bench-out/landmarks_isbi.json
	$(BIN)/python benchmarks/mri_real_slice.py --quick --json bench-out/mri_real_slice.json
	$(BIN)/python benchmarks/varnet_memory.py --quick --json bench-out/varnet_memory.json

clean:
	rm -rf $(VENV) runs bench-out
