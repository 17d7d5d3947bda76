"""A solve that cannot fit in memory is refused before anything is allocated, with a message
that says how much it needs, how much there is, and what to change (instead of a process the
kernel kills half-way through a dense 50,000 x 50,000 operator)."""

import pytest
import torch

from imc_kernels import _memory, top_eigvecs
from imc_kernels.linalg import block_lanczos, buffers


def _never_called(block):
    raise AssertionError("the operator was applied before the memory check")


def test_a_dense_operator_that_cannot_fit_is_refused():
    dim = 1_000_000
    # k close to dim sends the solver to the direct path: 4 dense dim x dim float64 matrices.
    with pytest.raises(MemoryError) as caught:
        block_lanczos(_never_called, dim, dim - 1, dtype=torch.float32)
    text = str(caught.value)
    assert "forming the 1000000 x 1000000 operator densely" in text
    assert f"needs {4 * dim * dim * 8 / 2**30:.3g} GiB" in text
    assert "ask for fewer eigenpairs (k)" in text


def test_a_basis_that_cannot_fit_is_refused(monkeypatch):
    dim, k = 10_000, 10
    available = {"bytes": 1 << 40}
    monkeypatch.setattr(_memory, "available_bytes", lambda device: available["bytes"])
    # Ten separated eigenvalues 100, 99, ..., 91 over a bulk in [0, 1).
    diagonal = torch.rand(dim, generator=torch.Generator().manual_seed(0))
    diagonal[:k] = torch.arange(100.0, 100.0 - k, -1)
    operator = lambda block: diagonal[:, None] * block  # noqa: E731
    buffers.empty_cache()  # cached buffers would count as free
    result = block_lanczos(operator, dim, k, tol=1e-6)  # plenty: it runs
    assert torch.allclose(result.eigenvalues.float(), diagonal[:k])
    buffers.empty_cache()
    # b = 1, m = 2k + 10 = 30: basis 31 rows, 3 block buffers and 10 Ritz vectors (44 vectors)
    # plus 30 stored products, float32.
    need = (31 + 3 + 10 + 30) * dim * 4
    available["bytes"] = need - 1
    with pytest.raises(MemoryError) as caught:
        block_lanczos(_never_called, dim, k)
    text = str(caught.value)
    assert f"the Krylov basis of 31 vectors of dim {dim} (k = {k}, block 1)" in text
    assert "smaller basis_size (now 30)" in text and "store_products=False" in text
    available["bytes"] = need
    block_lanczos(operator, dim, k, tol=1e-6)  # exactly enough is enough
    # A second solve of the same size takes the cached basis and products: only the rest
    # has to fit.
    available["bytes"] = (3 + 10) * dim * 4
    block_lanczos(operator, dim, k, tol=1e-6)
    buffers.empty_cache()
    # Without stored products the same memory is more than enough, and the advice drops it.
    available["bytes"] = (31 + 3 + 10) * dim * 4 - 1
    with pytest.raises(MemoryError) as caught:
        block_lanczos(_never_called, dim, k, store_products=False)
    assert "store_products" not in str(caught.value)


def test_top_eigvecs_refuses_before_any_product(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 3))
    batch = (torch.randn(16, 20), torch.randint(0, 3, (16,)))
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 1000)
    buffers.empty_cache()
    with pytest.raises(MemoryError, match="the Krylov basis of .* needs"):
        top_eigvecs(model, batch, 4)


def test_available_memory_is_read():
    available = _memory.available_bytes(torch.device("cpu"))
    if available is None:
        pytest.skip("no /proc/meminfo on this system")
    assert 0 < available
    assert _memory.available_bytes(torch.device("meta")) is None
    _memory.check_fits(1, torch.device("meta"), "x", "y")  # unknown: never refused
