# Developer entry points; PYTHON is the interpreter to use (make test PYTHON=venv/bin/python).
PYTHON ?= python
PYTEST_ARGS ?= -q

.PHONY: install test cuda-check lint bench-quick

# Editable install against the installed torch; builds imc_kernels._C (CPU, plus CUDA when
# the rule in imc_kernels/_ext.py holds) and prints one line saying which and why.
install:
	$(PYTHON) -m pip install --no-build-isolation -e .

test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# nvcc compile-check of every csrc/**/*.cu for sm_90 with the flags of the extension build;
# works without a GPU and with a CPU-only torch (tests/build/test_nvcc.py).
cuda-check:
	$(PYTHON) -m pytest tests/build/test_nvcc.py $(PYTEST_ARGS) -rs

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

bench-quick:
	$(PYTHON) benchmarks/hvp.py --quick
