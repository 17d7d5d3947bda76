"""Tall-skinny orthogonalization: CGS2, CholeskyQR2 with fp64 Grams, BCGS2, SVQB.

Tolerances: fp32 data has unit roundoff u = 6e-8. An orthonormalization that is O(u) gives
||Q^T Q - I|| of a few u times sqrt(b) (notes 3.3 measured 2e-7 to 4.5e-7 at n = 100k,
b = 16); 1e-6 leaves a margin of 2 to 10. fp64: u = 1.1e-16, bound 1e-13.
"""

import pytest
import torch

from imc_kernels.linalg import orthogonalize as orth

TOL = {torch.float32: 1e-6, torch.float64: 1e-13}


def _orthonormal(n, m, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    return q.to(dtype)


def _with_condition(n, b, kappa, seed, dtype):
    """``(n, b)`` block with singular values log-spaced from 1 to 1/kappa (built in fp64)."""
    u = _orthonormal(n, b, seed, torch.float64)
    v = _orthonormal(b, b, seed + 1, torch.float64)
    s = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), b, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)


def _gram_error(q):
    eye = torch.eye(q.shape[1], dtype=torch.float64)
    return (orth.xty(q, q) - eye).abs().max().item()


@pytest.mark.parametrize("m, b", [(7, 3), (600, 5), (3, 530)])
def test_xty_matches_fp64_and_splits_wide_operands(m, b):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(41, m, generator=gen)
    y = torch.randn(41, b, generator=gen)
    got = orth.xty(x, y)
    assert got.dtype == torch.float64 and got.shape == (m, b)
    # Both sides accumulate fp32 products exactly in fp64: only the summation order differs.
    torch.testing.assert_close(got, x.double().T @ y.double(), rtol=1e-13, atol=1e-12)
    assert orth.xty(x[:, :0], y).shape == (0, b)


@pytest.mark.parametrize("m, b", [(1, 1), (2, 1), (8, 1), (2, 4), (13, 1), (13, 3), (40, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_xty_on_leading_columns_of_a_row_major_buffer(m, b, dtype):
    # Every route of xty (upcast for tiny widths, y^T x for narrow y, the op on the whole
    # rows of the buffer) on the view the solver passes: the first m columns of a wider
    # row-major buffer whose other columns hold garbage, NaN and inf included.
    gen = torch.Generator().manual_seed(m * 100 + b)
    buffer = torch.randn(3001, 64, generator=gen, dtype=dtype)
    buffer[:, m:] = float("nan")
    buffer[::7, m + 1 :] = float("inf")
    x = buffer[:, :m]
    y = torch.randn(3001, b, generator=gen, dtype=dtype)
    got = orth.xty(x, y)
    assert got.shape == (m, b) and got.dtype == torch.float64
    torch.testing.assert_close(got, x.double().T @ y.double(), rtol=1e-13, atol=1e-11)
    # A view that does not start at column 0 cannot be widened; it must still be right.
    shifted = torch.randn(3001, m, generator=gen, dtype=dtype)
    buffer[:, 1 : m + 1] = shifted
    torch.testing.assert_close(
        orth.xty(buffer[:, 1 : m + 1], y), shifted.double().T @ y.double(), rtol=1e-13, atol=1e-11
    )


@pytest.mark.parametrize(
    "layout", ["contiguous", "basis column", "row of a buffer", "column of a row-major buffer"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_xty_of_one_column_with_itself(layout, dtype):
    # The Gram of a single vector (every step at b = 1): the op's in-place dot for contiguous
    # columns, a float64 norm for a strided one.
    gen = torch.Generator().manual_seed(5)
    n = 100_003
    source = torch.randn(3, n, generator=gen, dtype=torch.float64).to(dtype) * 1e3
    x = {
        "contiguous": source[0].clone().view(n, 1),
        "basis column": source.T[:, 1:2],
        "row of a buffer": source[2].view(n, 1),
        "column of a row-major buffer": source.T.contiguous()[:, 1:2],
    }[layout]
    got = orth.xty(x, x)
    exact = (x.double() * x.double()).sum()
    assert got.shape == (1, 1) and got.dtype == torch.float64
    assert abs(float(got) - float(exact)) <= n * 2.3e-16 * float(exact)
    # A different column of the same storage is not the same view: the general path.
    other = source.T[:, 0:1]
    torch.testing.assert_close(
        orth.xty(x, other), x.double().T @ other.double(), rtol=1e-12, atol=1e-6
    )


@pytest.mark.parametrize("m, b", [(2, 1), (20, 1), (33, 2)])
def test_xty_on_a_column_major_basis(m, b):
    # The single-vector solver's layout on CPU: one vector per row of an (M, n) buffer, the
    # basis its transpose; chunked float64 path (n spans several chunks, one partial).
    n = 2 * orth._COLUMN_MAJOR_CHUNK + 1234
    gen = torch.Generator().manual_seed(m)
    rows = torch.randn(m + 5, n, generator=gen)
    rows[m:] = float("nan")  # unused rows must not matter
    x = rows.T[:, :m]
    y = torch.randn(n, b, generator=gen)
    got = orth.xty(x, y)
    torch.testing.assert_close(got, x.double().T @ y.double(), rtol=1e-13, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [1, 3])
def test_block_cgs2_orthogonalizes_against_basis(dtype, b):
    n, m = 997, 40
    basis = _orthonormal(n, m, 0, dtype)
    gen = torch.Generator().manual_seed(1)
    block = torch.randn(n, b, generator=gen, dtype=dtype)
    # Mostly inside span(V): the first pass cancels 99.99 % of the norm, the second repairs.
    block = basis @ torch.randn(m, b, generator=gen, dtype=dtype) + 1e-4 * block
    original = block.clone()
    coeffs, out = orth.block_cgs2(basis, block)
    assert out is block
    norms = torch.linalg.vector_norm(out, dim=0).double()
    assert (orth.xty(basis, out).abs() / norms).max() <= TOL[dtype]
    rebuilt = basis.double() @ coeffs + out.double()
    # The relation holds to the rounding of the first update, u * ||block||.
    assert (rebuilt - original.double()).abs().max() <= 10 * torch.finfo(dtype).eps * 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e7])
def test_cholqr2_orthonormal_for_ill_conditioned_blocks(dtype, kappa):
    block = _with_condition(3001, 7, kappa, seed=2, dtype=dtype)
    # The default rank tolerance (100 eps = 1.2e-5 in fp32) calls a direction of relative
    # size 1e-7 lost; with tau = 0 the fp64 Gram still orthonormalizes it (notes 3.3 table).
    lost = dtype == torch.float32 and kappa > 1 / orth.default_rank_tol(dtype)
    _, _, info = orth.cholqr2(block)
    assert bool(info.deficient) == lost
    q, r, info = orth.cholqr2(block, tau=0.0)
    assert not bool(info.deficient)
    assert _gram_error(q) <= TOL[dtype]
    assert torch.equal(r, torch.triu(r))
    # Q R reproduces the block to the rounding of the fp32 application (u * kappa at most).
    error = (q.double() @ r - block.double()).abs().max().item()
    assert error <= 100 * torch.finfo(dtype).eps


@pytest.mark.parametrize("case", ["duplicate", "zero", "in_span_of_others"])
def test_cholqr2_reports_rank_loss(case):
    gen = torch.Generator().manual_seed(3)
    block = torch.randn(500, 4, generator=gen)
    if case == "duplicate":
        block[:, 2] = block[:, 0]
    elif case == "zero":
        block[:, 3] = 0.0
    else:
        block[:, 1] = 2 * block[:, 0] - 0.5 * block[:, 3]
    _, _, info = orth.cholqr2(block)
    assert bool(info.deficient)


def test_rank_check_is_relative_to_reference_norms():
    gen = torch.Generator().manual_seed(4)
    block = torch.randn(300, 3, generator=gen) * 1e-8  # column norms ~1.7e-7
    _, _, info = orth.cholqr(block)
    assert not bool(info.deficient)  # small but independent columns are fine
    _, _, info = orth.cholqr(block, reference=torch.ones(3, dtype=torch.float64))
    assert bool(info.deficient)  # ... unless they are noise relative to what they came from


@pytest.mark.parametrize("second_projection", ["always", "auto"])
@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e5])
def test_block_orthonormalize_keeps_basis_orthogonality(kappa, second_projection):
    # The case that motivates BCGS2 over CGS2 + CholQR2: a small, ill-conditioned remainder.
    # CGS2 + CholQR2 measured ||V^T Q|| = 6e-5 (kappa 1e4) and 6e-4 (1e5) on this setup.
    n, m, b = 4000, 60, 4
    basis = _orthonormal(n, m, 5, torch.float32)
    gen = torch.Generator().manual_seed(6)
    noise = torch.randn(n, b, generator=gen)
    noise[:, 1] = noise[:, 0] + noise[:, 1] / kappa
    block = basis @ torch.randn(m, b, generator=gen) + 1e-2 * noise
    original = block.clone()
    # tau = 0: the smallest direction is 1e-2 / kappa of the column, below the default rank
    # tolerance for kappa >= 1e4; this test is about the orthogonality, not the rank policy.
    # With "auto" the DGKS test must see the cancellation (99 % of the norm is in span(V))
    # and the dependent columns, and project twice.
    coeffs, q, coupling, _, info = orth.block_orthonormalize(
        basis, block, tau=0.0, second_projection=second_projection
    )
    assert not bool(info.deficient)
    assert orth.xty(basis, q).abs().max() <= 1e-6
    assert _gram_error(q) <= 1e-6
    rebuilt = basis.double() @ coeffs + q.double() @ coupling
    assert (rebuilt - original.double()).abs().max() <= 1e-5


def test_block_orthonormalize_auto_skips_the_second_projection_only_when_safe(monkeypatch):
    n, m = 4000, 30
    basis = _orthonormal(n, m, 9, torch.float32)
    gen = torch.Generator().manual_seed(10)
    calls = []
    real = orth.project_out

    def counting(v, w):
        calls.append(v.shape[1])
        return real(v, w)

    monkeypatch.setattr(orth, "project_out", counting)
    # Nearly orthogonal to V already (components 1e-3 of the norm): one projection.
    fresh = torch.randn(n, 2, generator=gen) + basis @ (1e-3 * torch.randn(m, 2, generator=gen))
    _, q, _, _, _ = orth.block_orthonormalize(basis, fresh, second_projection="auto")
    assert calls == [m]
    assert orth.xty(basis, q).abs().max() <= 1e-6 and _gram_error(q) <= 1e-6
    # Mostly inside span(V): two.
    calls.clear()
    inside = basis @ torch.randn(m, 2, generator=gen) + 1e-2 * torch.randn(n, 2, generator=gen)
    _, q, _, _, _ = orth.block_orthonormalize(basis, inside, second_projection="auto")
    assert calls == [m, m]
    assert orth.xty(basis, q).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="second_projection must be one of"):
        orth.block_orthonormalize(basis, fresh, second_projection="never")


def test_block_orthonormalize_prior_norms_enter_the_reference():
    # A block whose remainder is tiny relative to what was projected out before the call
    # (a local pass) is rank deficient, though large relative to its own input norm.
    basis = _orthonormal(500, 10, 11, torch.float32)
    gen = torch.Generator().manual_seed(12)
    block = 1e-7 * torch.randn(500, 2, generator=gen)
    *_, info = orth.block_orthonormalize(basis, block.clone())
    assert not bool(info.deficient)
    prior = torch.ones(2, dtype=torch.float64)  # the block once had norm ~1
    *_, info = orth.block_orthonormalize(basis, block.clone(), prior_norms_sq=prior)
    assert bool(info.deficient)


def test_block_orthonormalize_flags_block_inside_basis():
    basis = _orthonormal(800, 30, 7, torch.float32)
    gen = torch.Generator().manual_seed(8)
    block = basis @ torch.randn(30, 3, generator=gen)
    *_, info = orth.block_orthonormalize(basis, block)
    assert bool(info.deficient)
    # Its columns were measured as new at the rounding level only.
    assert info.ratio.max() < orth.default_rank_tol(torch.float32)


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_svqb_drops_dependent_directions(method, dtype):
    gen = torch.Generator().manual_seed(9)
    block = torch.randn(700, 5, generator=gen, dtype=torch.float64)
    block[:, 3] = block[:, 0] + 3 * block[:, 1]
    block[:, 4] *= 1e-3  # small but independent: kept (diagonal scaling / relative 1e-3)
    block = block.to(dtype)
    q, coupling = orth.svqb(block, method=method)
    assert q.shape == (700, 4) and coupling.shape == (4, 5)
    # gram: Q is orthonormal to u / (smallest kept scaled singular value ~ 0.3); svd: to u.
    assert _gram_error(q) <= 10 * TOL[dtype]
    error = (q.double() @ coupling - block.double()).abs().max().item()
    assert error <= 1e3 * torch.finfo(dtype).eps
    q_all, _ = orth.svqb(block, drop=False, method=method)
    assert q_all.shape == (700, 5)


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_svqb_of_zero_block_is_empty(method):
    q, coupling = orth.svqb(torch.zeros(50, 3), method=method)
    assert q.shape == (50, 0) and coupling.shape == (0, 3)


def test_svqb_svd_resolves_below_the_gram_limit():
    # A direction of relative size 1e-10 in fp64: invisible to the Gram (sqrt(eps) = 1.5e-8)
    # and dropped there; kept by the SVD, which honours tau = 100 eps = 2.2e-14.
    gen = torch.Generator().manual_seed(12)
    block = torch.randn(400, 3, generator=gen, dtype=torch.float64)
    block[:, 2] = block[:, 0] + 1e-10 * block[:, 2]
    assert orth.svqb(block, method="gram")[0].shape[1] == 2
    q, coupling = orth.svqb(block, method="svd")
    assert q.shape[1] == 3
    torch.testing.assert_close(q @ coupling, block, rtol=0, atol=1e-13)


def test_random_orthonormal_block_is_seeded_and_orthogonal():
    basis = _orthonormal(300, 20, 10, torch.float32)
    first = orth.random_orthonormal_block(basis, 4, torch.Generator().manual_seed(11))
    again = orth.random_orthonormal_block(basis, 4, torch.Generator().manual_seed(11))
    assert torch.equal(first, again)
    assert orth.xty(basis, first).abs().max() <= 1e-6
    assert _gram_error(first) <= 1e-6
    with pytest.raises(ValueError, match="cannot draw"):
        orth.random_orthonormal_block(basis, 281, torch.Generator())
