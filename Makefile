# `make demo` and `make test` each set up everything they need from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint docs docs-examples bench-zoo matrix clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mvd export fastvit_sa12 --format onnx -o build/demo/fastvit_sa12.onnx
	$(BIN)/mvd verify fastvit_sa12 --formats onnx --json build/demo/verify.json --junit build/demo/verify.xml
	$(BIN)/mvd bench fastvit_sa12 --min-time 1 --json build/demo/bench.json

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything that proves a feature works, slow tests included. CI runs this, on two
# workers: most of the time is single-threaded conversion, so two cores run two tests.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -m '' -q -n $(TEST_WORKERS) --durations=25

# The quick loop while developing: skips tests marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q

# The documentation site (docs/, mkdocs.yml) into build/site. --strict: a broken link,
# a missing anchor or a nav entry without its page fails the build. The CLI reference
# is generated from the typer app on every build (scripts/docs_hooks.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Runs the commands the docs show and writes their real output into the pages
# (between <!-- run --> markers): 25 min on 2 busy cores. Not part of `make test` or `make docs`.
docs-examples: $(STAMP)
	$(BIN)/python scripts/docs_examples.py

bench-zoo: $(STAMP)
	$(BIN)/python benchmarks/run_zoo.py

# Every model x format x precision, verified; writes benchmarks/MATRIX.md. Not in `make test`.
matrix: $(STAMP)
	$(BIN)/python benchmarks/run_matrix.py

# The emulated aarch64 device `--device arm64` runs on (docs/arm.md); as root, cached in
# .arm-device/ (about 1 GB), each step skipped once done.
arm-device:
	scripts/arm_device.sh

clean:
	rm -rf build .pytest_cache .ruff_cache
