# Two commands on a fresh machine:
#   make run    set everything up, then run the default job (2 DeepSpeed ranks on CPU, about 10 minutes)
#   make test   set everything up, then run the test suite
PYTHON ?= python3
# GLUE files: $MTP_GLUE_DIR if set, else the shared copy beside the checkout when there is one (else the hub)
MTP_GLUE_DIR ?= $(wildcard $(abspath ..)/shared/data/glue)
export MTP_GLUE_DIR

.PHONY: setup run test lint unit bench

setup: .setup.stamp

# torch is installed first and pinned on machines without CUDA: an unpinned torch pulls a 5 GB CUDA build.
.setup.stamp: pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	bash launch.sh --config configs/default.yaml $(ARGS)

# Tests run side by side on TEST_WORKERS processes (pytest-xdist): most of a test's time is starting Python and
# DeepSpeed, one core each. The tests that read a fixture which trains (zero_runs, method_runs, a teacher) share an
# xdist_group (tests/integration/conftest.py), so it trains once; the Ray searches are one group (one cluster at a time).
TEST_WORKERS ?= 2
test: setup lint
	$(PYTHON) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# ruff, and the import graph: no circles, the layers of pyproject.toml's [tool.importlinter]
lint: setup
	$(PYTHON) -m ruff check mtp tune bench tests
	$(PYTHON) -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"

# the fast layer alone (no GLUE data, no DeepSpeed launches): about a minute
unit: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/unit $(PYTEST_ARGS)

bench: setup
	$(PYTHON) bench/throughput.py
