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

.PHONY: setup check main fashion-mnist install test cuda-check lint bench-quick gpu-carry

$(VENV)/.installed: setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)" numpy pybind11 ninja pytest \
		ruff==0.17.6 scipy tqdm matplotlib==3.11.2 scikit-learn==1.9.1
	@# pip shows a build's output only with -v: keep it in a log, print the build's own line.
	$(PYTHON) -m pip install -v --no-build-isolation --no-deps -e . >$(VENV)/build.log 2>&1 \
		|| { tail -n 40 $(VENV)/build.log; exit 1; }
	@sed -n 's/^ *\(imc_kernels: .*\)/\1/p' $(VENV)/build.log
	touch $@

setup: $(VENV)/.installed

# The test command of the README and of CI: the whole suite (Triton kernels under
# TRITON_INTERPRET=1 on CPU, nvcc compile-check of every .cu file), then ruff.
check: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS) -rs
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m imc_kernels.env_report

# The main job: imc-prune on Fashion-MNIST with LeNet-300-100 (digits where Fashion-MNIST cannot
# be installed): dense accuracy, IMC at its automatic sparsity and at 5 % and 2 % of the
# weights, pruned accuracies, the plots, and where the files are (runs/main).
main: setup fashion-mnist
	$(PYTHON) -m imc_kernels.env_report
	$(VENV)/bin/imc-prune run --remaining auto 5% 2% --out runs/main $(MAIN_ARGS)

# Fashion-MNIST from Debian's dataset-fashion-mnist when it is missing and apt-get can run;
# otherwise imc-prune falls back to scikit-learn digits and says so.
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
fashion-mnist:
	@if [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ] || [ -n "$$IMC_DATA" ]; then \
		echo "Fashion-MNIST: $${IMC_DATA:-$(FMNIST_DIR)}"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
			|| echo "note: apt-get could not install dataset-fashion-mnist; using digits"; \
	else \
		echo "note: Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist);" \
			"using scikit-learn digits"; \
	fi

# Editable install against the installed torch; builds imc_kernels._C (CPU, plus CUDA when
# the rule in imc_kernels/_ext.py holds) and prints one line saying which and why.
install:
	@log=$$(mktemp); $(PYTHON) -m pip install -v --no-build-isolation --no-deps -e . >$$log 2>&1 \
		|| { tail -n 40 $$log; rm -f $$log; exit 1; }; sed -n 's/^ *\(imc_kernels: .*\)/\1/p' $$log; rm -f $$log

test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# nvcc compile-check of every csrc/**/*.cu for sm_90 with the flags of the extension build;
# works without a GPU and with a CPU-only torch (tests/build/test_nvcc.py).
cuda-check:
	$(PYTHON) -m pytest tests/build/test_nvcc.py $(PYTEST_ARGS) -rs

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

# What a lent GPU machine needs and lacks, for benchmarks/gpu_session.sh (name .gpu_carry in
# the device tool's carry): Fashion-MNIST's IDX files and the peers' wheels, about 31 MB.
PEER_WHEELS ?= PyHessian==0.1 hessian-eigenthings==1.0.0a5 curvlinops-for-pytorch==3.0.1 einconv==0.1.0
gpu-carry: fashion-mnist
	mkdir -p .gpu_carry/fashion-mnist .gpu_carry/wheels
	cp "$${IMC_DATA:-$(FMNIST_DIR)}"/*-idx?-ubyte.gz .gpu_carry/fashion-mnist/
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
		-d .gpu_carry/wheels $(PEER_WHEELS)
	du -sh .gpu_carry

bench-quick:
	$(PYTHON) benchmarks/hvp.py --quick --no-save
