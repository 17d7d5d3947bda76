# Developer entry points.
#
# On a fresh machine `make check` (the tests, what .ci/run runs) and `make main` (the main job)
# set up everything themselves: a virtual environment in .venv with the pinned CPU stack
# (torch 2.13.0 CPU wheel, triton 3.6.0) and an editable build of the package.
# Inside an environment you manage yourself: `make test PYTHON=python`.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
PYTEST_ARGS ?= -q
# Pinned: a bare `torch` would pull a CUDA build of several GB onto a CPU machine.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0

.PHONY: setup check main install test cuda-check lint bench-quick

$(VENV)/.installed: setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)" numpy pybind11 ninja pytest \
		ruff==0.17.6 scipy tqdm matplotlib==3.11.2 scikit-learn==1.9.1
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# The test command of the README and of CI: the whole suite (Triton kernels under
# TRITON_INTERPRET=1 on CPU, nvcc compile-check of every .cu file), then ruff.
check: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS) -rs
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m imc_kernels.env_report

# The main job: what the package builds and runs, then the HVP benchmark in quick mode.
main: setup
	$(PYTHON) -m imc_kernels.env_report
	$(PYTHON) benchmarks/hvp.py --quick --no-save

# Editable install against the installed torch; builds imc_kernels._C (CPU, plus CUDA when
# the rule in imc_kernels/_ext.py holds) and prints one line saying which and why.
install:
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .

test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# nvcc compile-check of every csrc/**/*.cu for sm_90 with the flags of the extension build;
# works without a GPU and with a CPU-only torch (tests/build/test_nvcc.py).
cuda-check:
	$(PYTHON) -m pytest tests/build/test_nvcc.py $(PYTEST_ARGS) -rs

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

bench-quick:
	$(PYTHON) benchmarks/hvp.py --quick --no-save
