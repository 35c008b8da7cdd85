# Everything runs from the checkout's own virtual environment, created by `make install`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	command -v fusermount3 >/dev/null || (apt-get update -qq && apt-get install -y -qq fuse3) || echo "fuse3 missing: mount tests will skip"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,train]' --config-settings editable_mode=compat
	$(BIN)/python -m compileall -q mstore trainer
	touch $(STAMP)

demo: install
	$(BIN)/python -m trainer.demo demo-work/trainer
	$(BIN)/python demo/demo.py

test: install
	$(BIN)/ruff check mstore trainer tests bench demo docs
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

docs: install
	$(BIN)/python docs/gen_cli.py

lint: install
	$(BIN)/ruff check mstore trainer tests bench demo docs
	$(BIN)/lint-imports

bench: install
	$(BIN)/python bench/bench_store.py

clean:
	rm -rf $(VENV) demo-work bench/out .pytest_cache
