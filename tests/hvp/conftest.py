"""Fixtures for the HVP tests: the fp64 oracles and the model catalogue of ``oracles.py``.

The tests run with ``--import-mode=importlib``, so ``oracles.py`` is not importable by name;
it is loaded here once and handed out through fixtures. A test that takes ``case_name`` is
parametrized over the whole catalogue
(unless it names its own cases).
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def _load_oracles():
    name = "imc_kernels_tests_hvp_oracles"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("oracles.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ORACLES = _load_oracles()


def pytest_generate_tests(metafunc):
    """``case_name`` ranges over the catalogue unless the test parametrizes it itself."""
    explicit = any(
        "case_name" in marker.args[0] for marker in metafunc.definition.iter_markers("parametrize")
    )
    if "case_name" in metafunc.fixturenames and not explicit:
        metafunc.parametrize("case_name", list(ORACLES.CASES))


@pytest.fixture(scope="session")
def oracles():
    """The ``oracles.py`` module: ``dense_hessian``, ``dense_ggn``, ``build_case``, ..."""
    return ORACLES


@pytest.fixture(scope="session")
def dense_oracle():
    """``dense_oracle(case_name, curvature)``: the catalogue entry's fp64 matrix, cached."""
    cache = {}

    def get(case_name: str, curvature: str) -> torch.Tensor:
        if (case_name, curvature) not in cache:
            model, loss_fn, batch = ORACLES.build_case(case_name)
            cache[case_name, curvature] = ORACLES.dense(curvature, model, loss_fn, batch)
        return cache[case_name, curvature]

    return get


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny GEMMs and convolutions: on a shared 2-core machine a second OpenMP thread only
    # spins against the other jobs. Results here do not depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
