"""The solver buffer cache (imc_kernels.linalg.buffers): reuse, safety, limits.

The property that matters: a solve that runs on buffers left over from another solve (stale
contents, here poisoned with NaN) gives bitwise the result of a solve on fresh memory, and a
buffer something else still refers to is never handed out again.
"""

import gc

import pytest
import torch

from imc_kernels.linalg import block_lanczos, buffers

DIM = 301


@pytest.fixture(autouse=True)
def _clean_cache():
    buffers.empty_cache()
    buffers.set_cache_limit(None)
    yield
    buffers.empty_cache()
    buffers.set_cache_limit(None)


@pytest.fixture(scope="module")
def matrix(make_spectrum_matrix):
    gen = torch.Generator().manual_seed(3)
    top = torch.tensor([40.0, 31.0, 25.0, 20.0, 17.0, 15.0], dtype=torch.float64)
    bulk = 8.0 * torch.rand(DIM - top.numel(), generator=gen, dtype=torch.float64) - 2.0
    a, _ = make_spectrum_matrix(torch.cat([top, bulk]), seed=5)
    return a.float()


def _poison_cache():
    """Fill every cached buffer with NaN (what a solve must never read before writing)."""
    taken = []
    while buffers._free:
        taken.append(buffers._free.pop())
    for buffer in taken:
        buffer.fill_(float("nan"))
        assert buffers.give(buffer)


def test_take_give_reuses_the_memory():
    first = buffers.take(1000, torch.float32, "cpu")
    pointer = first.data_ptr()
    assert buffers.give(first)
    assert buffers.cached_bytes() == 4000
    del first
    assert buffers.take(999, torch.float32, "cpu").data_ptr() != pointer  # other size: fresh
    assert buffers.take(1000, torch.float64, "cpu").data_ptr() != pointer  # other dtype: fresh
    again = buffers.take(1000, torch.float32, "cpu", zero=True)
    assert again.data_ptr() == pointer and bool((again == 0).all())
    assert buffers.cached_bytes() == 0


def test_a_buffer_with_a_live_view_is_not_kept():
    buffer = buffers.take(64, torch.float32, "cpu")
    view = buffer.view(8, 8).T
    assert not buffers.give(buffer)
    assert not buffers.give(view)  # a view itself is never kept either
    assert buffers.cached_bytes() == 0
    del view
    assert buffers.give(buffer)


def test_limit_drops_the_oldest_first():
    buffers.set_cache_limit(10_000)
    a, b, c = (buffers.take(1000, torch.float32, "cpu") for _ in range(3))
    pointers = [t.data_ptr() for t in (a, b, c)]
    assert buffers.give(a) and buffers.give(b)
    del a, b
    assert buffers.cached_bytes() == 8000
    assert buffers.give(c)  # 12,000 > 10,000: the oldest (a) goes
    del c
    assert buffers.cached_bytes() == 8000
    assert [t.data_ptr() for t in buffers._free] == pointers[1:]
    assert not buffers.give(buffers.take(5000, torch.float32, "cpu"))  # over the limit alone
    buffers.set_cache_limit(4000)  # shrinking trims at once
    assert buffers.cached_bytes() == 4000
    buffers.set_cache_limit(0)
    assert buffers.cached_bytes() == 0


def test_bad_limits_are_rejected(monkeypatch):
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="cache limit"):
            buffers.set_cache_limit(bad)
    monkeypatch.setenv(buffers.ENV_CACHE_BYTES, "lots")
    with pytest.raises(ValueError, match="IMC_SOLVER_CACHE_BYTES='lots'"):
        buffers.default_cache_bytes()
    monkeypatch.setenv(buffers.ENV_CACHE_BYTES, "123")
    assert buffers.default_cache_bytes() == 123


@pytest.mark.parametrize(
    "options",
    [
        {"block_size": 1},  # column-major basis, single-vector steps
        {"block_size": 3},  # row-major basis, zero-filled
        {"block_size": 2, "basis_size": 12},  # restarts
    ],
)
def test_solve_on_stale_buffers_is_bitwise_a_fresh_solve(matrix, options):
    buffers.set_cache_limit(0)
    fresh = block_lanczos(matrix, DIM, 4, seed=2, **options)
    buffers.set_cache_limit(None)
    block_lanczos(matrix, DIM, 4, seed=9, **options)  # leaves its buffers behind
    assert buffers.cached_bytes() > 0
    _poison_cache()
    cached = buffers.cached_bytes()
    again = block_lanczos(matrix, DIM, 4, seed=2, **options)
    assert buffers.cached_bytes() == cached  # took the poisoned buffers, gave them back
    assert torch.equal(fresh.eigenvalues, again.eigenvalues)
    assert torch.equal(fresh.eigenvectors, again.eigenvectors)
    assert torch.equal(fresh.residuals, again.residuals)
    assert fresh.n_matvecs == again.n_matvecs
    # The result owns its memory: nothing of it is in the cache.
    pointers = {t.untyped_storage().data_ptr() for t in buffers._free}
    assert again.eigenvectors.untyped_storage().data_ptr() not in pointers


def test_a_basis_view_kept_by_a_callback_is_never_reused(matrix):
    kept = []
    block_lanczos(matrix, DIM, 4, block_size=2, callback=lambda cycle: kept.append(cycle.basis))
    snapshot = kept[-1].clone()
    assert buffers.cached_bytes() > 0  # the stored products came back, the basis did not
    block_lanczos(matrix, DIM, 4, block_size=2, seed=11)
    block_lanczos(matrix, DIM, 4, block_size=2, seed=12)
    assert torch.equal(kept[-1], snapshot)


def test_disabled_cache_keeps_nothing(matrix, monkeypatch):
    monkeypatch.setenv(buffers.ENV_CACHE_BYTES, "0")
    buffers.set_cache_limit(None)  # re-read the environment
    block_lanczos(matrix, DIM, 4)
    assert buffers.cached_bytes() == 0


def test_a_hessian_solve_gives_back_its_basis():
    """The operator's products keep no view of the basis: both the basis and the stored
    products come back to the cache (the fused engine's rules once kept their last tangents,
    views of a basis row, and the basis was reallocated by every solve)."""
    from torch import nn

    from imc_kernels import HessianOperator, top_eigvecs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    batch = (torch.randn(64, 12), torch.randint(0, 4, (64,)))
    operator = HessianOperator(model, None, batch, engine="fused")
    # A product of the widest block first: the operator's kept buffers reach their final size,
    # so no outgrown one goes to the cache during the solves below.
    operator @ torch.randn(operator.dim, 2)
    for options in ({"block_size": 1}, {"block_size": 2}):
        # Dead operators of earlier tests hand their workspace buffers to the cache when the
        # garbage collector reaches them: collect them first, so that none arrives mid-solve.
        gc.collect()
        buffers.empty_cache()
        block_lanczos(operator, operator.dim, 3, seed=1, **options)
        sizes = sorted(t.numel() for t in buffers._free)
        assert len(sizes) == 2, sizes  # the basis and the stored products
        taken = list(buffers._free)
        top_eigvecs(operator, None, 3, block_size=options["block_size"])
        # The second solve took both buffers and gave both back.
        pointers = {t.data_ptr() for t in buffers._free}
        assert pointers == {t.data_ptr() for t in taken}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("start", [0, 1, 4, 6])
def test_copy_block_copies_column_slices_either_way(dtype, b, start):
    """copy_block (the solver's copies between basis slots and contiguous blocks) is a plain
    copy bit for bit, whether it takes the 16-byte-element path or falls back (a slot off a
    16-byte boundary, a row not a multiple of 16 bytes, a transposed source)."""
    from imc_kernels.linalg.block_lanczos import copy_block

    g = torch.Generator().manual_seed(b + 10 * start)
    basis = torch.randn(1001, 20, generator=g, dtype=dtype)
    block = torch.randn(1001, b, generator=g, dtype=dtype)
    slot = basis[:, start : start + b]
    before = basis.clone()
    copy_block(slot, block)
    expected = before.clone()
    expected[:, start : start + b] = block
    assert torch.equal(basis, expected)  # the slot, and nothing around it
    out = torch.empty(1001, b, dtype=dtype)
    copy_block(out, basis[:, start : start + b])
    assert torch.equal(out, block)
    transposed = block.T.contiguous().T  # column-major source
    copy_block(out, transposed)
    assert torch.equal(out, block)
