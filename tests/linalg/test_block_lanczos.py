"""Thick-restart block Lanczos against dense fp64 ``eigh`` on operators with known spectra.

Tolerances (errors measured relative to ||H||, the scale the solver's tol uses):

* eigenvalues, fp32 operator: 1e-5. A Ritz value with residual r is within r^2 / gap of an
  eigenvalue, and the fp32 products add about u * ||H|| ~ 1e-7 (u = 6e-8); with tol = 1e-5 and
  relative gaps >= 0.1 the first term is 1e-9, so 1e-5 is 100x above what is expected.
* eigenvalues, fp64 operator (tol = 1e-10): r^2 / gap ~ 1e-19 plus u_64 * ||H|| ~ 1e-16;
  1e-10 leaves the same kind of margin and is what the solver's tol promises.
* eigenvectors: sin(angle to the true vector) <= r / gap (Davis-Kahan), so 10 * tol / gap.
* clusters (exact multiplicities): the principal angles between the computed and the true
  eigenspace, with the gap from the cluster to the rest of the spectrum.
"""

import importlib
import math
import re

import pytest
import torch

from imc_kernels.linalg import block_lanczos, expand_block, orthogonalize

# The package exports the function under the module's name; reach the module itself.
bl_module = importlib.import_module("imc_kernels.linalg.block_lanczos")

DIM = 397  # awkward: prime, not a multiple of any block size
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
VALUE_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# Outliers at both ends, a bulk straddling 0: LA, SA and LM all have distinct answers, and
# the 4 wanted of each are separated from the rest by >= 5 (relative gap >= 0.16).
OUTLIERS = [30.0, 20.0, 15.0, 12.0, -25.0, -18.0, -9.0, -6.0]


@pytest.fixture(scope="module")
def problem(make_spectrum_matrix):
    gen = torch.Generator().manual_seed(0)
    bulk = -1.0 + 6.0 * torch.rand(DIM - len(OUTLIERS), generator=gen, dtype=torch.float64)
    eigenvalues = torch.cat([torch.tensor(OUTLIERS, dtype=torch.float64), bulk])
    matrix, vectors = make_spectrum_matrix(eigenvalues, seed=1)
    return matrix, eigenvalues, vectors


def _reference(eigenvalues, vectors, which, k):
    if which == "LA":
        order = torch.argsort(eigenvalues, descending=True)
    elif which == "SA":
        order = torch.argsort(eigenvalues)
    else:
        order = torch.argsort(eigenvalues.abs(), descending=True)
    return eigenvalues[order[:k]], vectors[:, order[:k]], order


def _subspace_sines(computed, reference):
    """Sines of the principal angles between two column spaces (fp64).

    From the part of one basis outside the other, ``svdvals((I - Q2 Q2^T) Q1)``: accurate for
    small angles, unlike ``sqrt(1 - cos^2)``, which cannot go below ~1.5e-8.
    """
    q1, _ = torch.linalg.qr(computed.double())
    q2, _ = torch.linalg.qr(reference.double())
    return torch.linalg.svdvals(q1 - q2 @ (q2.T @ q1))


def _vector_sines(computed, reference):
    """Sine of the angle between matching unit columns, accurately (see above)."""
    computed, reference = computed.double(), reference.double()
    cosines = (computed * reference).sum(0)
    return torch.linalg.vector_norm(computed - reference * cosines, dim=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("k, block_size", [(4, None), (4, 3), (3, 1)])
@pytest.mark.parametrize("orthogonalization", ["adaptive", "two_pass"])
def test_matches_dense_eigh(problem, dtype, which, k, block_size, orthogonalization):
    matrix, eigenvalues, vectors = problem
    res = block_lanczos(
        matrix.to(dtype),
        DIM,
        k,
        which=which,
        tol=TOL[dtype],
        block_size=block_size,
        orthogonalization=orthogonalization,
    )
    want_values, want_vectors, _ = _reference(eigenvalues, vectors, which, k)
    h_norm = eigenvalues.abs().max().item()
    assert res.all_converged
    assert res.eigenvalues.dtype == torch.float64 and res.eigenvalues.shape == (k,)
    assert res.eigenvectors.dtype == dtype and res.eigenvectors.shape == (DIM, k)
    assert (res.eigenvalues - want_values).abs().max() / h_norm <= VALUE_TOL[dtype]
    # ||H||_est is the largest |Ritz value| seen: a lower bound of ||H|| (Ritz values lie in
    # the spectrum's hull), at least the wanted |lambda|, and close once the top is resolved.
    assert want_values.abs().max() * (1 - 1e-6) <= res.h_norm <= h_norm * (1 + 1e-6)
    if which != "SA":
        assert math.isclose(res.h_norm, h_norm, rel_tol=1e-6)
    # Gap of each wanted outlier to the rest of the spectrum is >= 3 (relative >= 0.1).
    assert _vector_sines(res.eigenvectors, want_vectors).max() <= 10 * TOL[dtype] / 0.1
    gram = res.eigenvectors.double().T @ res.eigenvectors.double()
    assert (gram - torch.eye(k, dtype=torch.float64)).abs().max() <= 10 * TOL[dtype]
    # The reported residuals are the true ones.
    product = matrix @ res.eigenvectors.double()
    true = torch.linalg.vector_norm(product - res.eigenvectors.double() * res.eigenvalues, dim=0)
    torch.testing.assert_close(res.residuals, true / res.h_norm, rtol=0.05, atol=1e-6)
    assert res.residuals.max() <= 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multiplicity_larger_than_block_size(make_spectrum_matrix, dtype):
    # 10 five times, then 8 and 7: k = 7 needs all five copies, the block holds two.
    gen = torch.Generator().manual_seed(2)
    head = torch.tensor([10.0] * 5 + [8.0, 7.0], dtype=torch.float64)
    eigenvalues = torch.cat([head, 5.0 * torch.rand(DIM - 7, generator=gen, dtype=torch.float64)])
    matrix, vectors = make_spectrum_matrix(eigenvalues, seed=3)
    res = block_lanczos(matrix.to(dtype), DIM, 7, block_size=2, tol=TOL[dtype])
    assert res.all_converged
    assert (res.eigenvalues - head).abs().max() / 10.0 <= VALUE_TOL[dtype]
    # The 5-dimensional eigenspace, up to rotation: gap to the rest is 2 (relative 0.2).
    sines = _subspace_sines(res.eigenvectors[:, :5], vectors[:, :5])
    assert sines.max() <= 10 * TOL[dtype] / 0.2


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_exact_rank_loss(make_spectrum_matrix, which):
    # Rank 12 < basis (24): the Krylov space becomes invariant after a few blocks and the
    # solver must repair (random replacement) rather than divide by a zero residual.
    rank = 12
    gen = torch.Generator().manual_seed(4)
    nonzero = 1.0 + 9.0 * torch.rand(rank, generator=gen, dtype=torch.float64)
    eigenvalues = torch.cat([nonzero, torch.zeros(DIM - rank, dtype=torch.float64)])
    matrix, vectors = make_spectrum_matrix(eigenvalues, seed=5)
    res = block_lanczos(matrix, DIM, 5, which=which, block_size=4, tol=1e-10)
    assert res.basis_size == 24
    assert res.all_converged
    if which == "LA":
        want = torch.sort(nonzero, descending=True).values[:5]
    else:
        want = torch.zeros(5, dtype=torch.float64)
    assert (res.eigenvalues - want).abs().max() / nonzero.max() <= 1e-10
    assert res.residuals.max() <= 1e-9
    gram = res.eigenvectors.T @ res.eigenvectors
    assert (gram - torch.eye(5, dtype=torch.float64)).abs().max() <= 1e-12
    if which == "SA":  # null vectors: orthogonal to the range
        assert (vectors[:, :rank].T @ res.eigenvectors).abs().max() <= 1e-9


def test_zero_operator():
    res = block_lanczos(lambda block: torch.zeros_like(block), 200, 2, block_size=2)
    assert res.all_converged
    assert res.eigenvalues.abs().max() == 0 and res.residuals.abs().max() == 0


@pytest.mark.parametrize("dim, k", [(12, 3), (30, 29), (6, 1), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dim_not_larger_than_basis_is_exact(make_spectrum_matrix, dim, k, dtype):
    # basis + one block >= dim: the operator is formed with dim products and solved directly.
    gen = torch.Generator().manual_seed(dim)
    eigenvalues = torch.randn(dim, generator=gen, dtype=torch.float64)
    eigenvalues[0] = eigenvalues[1]  # a double eigenvalue too
    matrix, _ = make_spectrum_matrix(eigenvalues, seed=dim)
    res = block_lanczos(matrix.to(dtype), dim, k, which="SA")
    assert res.n_matvecs == dim and res.restarts == 0 and res.all_converged
    want = torch.sort(eigenvalues).values[:k]
    # Direct eigh of the operator rounded to `dtype`: errors of a few u * ||H|| (||H|| <~ 3).
    assert (res.eigenvalues - want).abs().max() <= 100 * torch.finfo(dtype).eps
    assert res.residuals.max() <= 100 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dim, k, block_size", [(20, 3, None), (9, 1, 1)])
def test_dim_just_above_basis_krylov_fills_space(make_spectrum_matrix, dim, k, block_size):
    # basis + block = dim - 2 and dim - 3: the Krylov path, nearly the whole space per cycle.
    gen = torch.Generator().manual_seed(dim)
    eigenvalues = torch.randn(dim, generator=gen, dtype=torch.float64)
    matrix, _ = make_spectrum_matrix(eigenvalues, seed=dim)
    res = block_lanczos(matrix, dim, k, which="SA", block_size=block_size, tol=1e-12)
    assert res.all_converged and res.n_matvecs > 0
    want = torch.sort(eigenvalues).values[:k]
    assert (res.eigenvalues - want).abs().max() <= 1e-10


def test_k_equals_one_on_the_krylov_path(problem):
    matrix, eigenvalues, _ = problem
    res = block_lanczos(matrix.float(), DIM, 1, tol=1e-5)
    assert res.block_size == 1 and res.basis_size == 20
    assert abs(res.eigenvalues.item() - 30.0) / 30.0 <= 1e-5
    # Convergence is checked after every block: far fewer products than a full basis.
    assert res.n_matvecs < res.basis_size


def test_basis_stays_orthonormal_through_restarts(problem):
    matrix, eigenvalues, _ = problem
    errors = []

    def record(cycle):
        basis = cycle.basis.double()
        eye = torch.eye(basis.shape[1], dtype=torch.float64)
        errors.append((basis.T @ basis - eye).abs().max().item())

    # A small basis forces many restarts; the spectrum's top is easy, SA is harder.
    cycles = []

    def record_cycle(cycle):
        cycles.append(cycle.cycle)
        record(cycle)

    res = block_lanczos(
        matrix.float(),
        DIM,
        4,
        which="SA",
        block_size=2,
        basis_size=12,
        tol=1e-5,
        callback=record_cycle,
    )
    assert res.all_converged
    # The callback runs at every convergence check, several per restart cycle.
    assert res.restarts >= 3 and sorted(set(cycles)) == list(range(res.restarts + 1))
    assert len(errors) > res.restarts + 1
    # fp32 basis: design target ||V^T V - I|| <= 1e-6 at every restart (notes 3.8).
    assert max(errors) <= 1e-6


def test_orthogonality_and_locked_values_hold_over_many_restarts(make_spectrum_matrix):
    # An unreachable fp32 tol on a clustered spectrum: ~100 restarts until the cap. Without
    # re-orthonormalizing the kept Ritz vectors, Y^T Y - I drifted to 1e-6 over a few hundred
    # restarts; with it, it stays at a few u. The locked values must not drift either (a
    # projection-style update of T drifted them by ~1e-7 per re-orthonormalization).
    eigenvalues = torch.linspace(0.0, 1.0, DIM, dtype=torch.float64)
    matrix, _ = make_spectrum_matrix(eigenvalues, seed=13)
    errors = []

    def record(cycle):
        basis = cycle.basis.double()
        eye = torch.eye(basis.shape[1], dtype=torch.float64)
        errors.append((basis.T @ basis - eye).abs().max().item())

    res = block_lanczos(
        matrix.float(),
        DIM,
        6,
        block_size=3,
        basis_size=18,
        tol=1e-9,
        max_matvecs=1000,
        callback=record,
    )
    assert res.restarts >= 80 and not res.all_converged
    # Kept vectors are re-orthonormalized past 2 eps = 2.4e-7; measured 2.3e-7 with it and
    # 4.7e-7 without it on this run.
    assert max(errors) <= 3e-7
    # Spacing 1/396 = 2.5e-3: fp32 rounding (~1e-7) dominates r^2 / gap.
    assert (res.eigenvalues - eigenvalues.flip(0)[:6]).abs().max() <= 1e-6


def test_callback_can_stop_and_sees_cycles(problem):
    matrix, _, _ = problem
    seen = []

    def stop_in_second_cycle(cycle):
        seen.append((cycle.cycle, cycle.n_matvecs, cycle.ritz_values.shape, cycle.basis_columns))
        return cycle.cycle == 1

    res = block_lanczos(
        matrix.float(), DIM, 4, block_size=2, basis_size=12, tol=1e-7, callback=stop_in_second_cycle
    )
    # One call per block (check_every=1): 2, 4, ..., 12 columns, then the restart.
    assert [s[0] for s in seen] == [0] * 6 + [1]
    assert [s[3] for s in seen[:6]] == [2, 4, 6, 8, 10, 12]
    # While fewer than k Ritz values exist, the list is shorter.
    assert seen[0][2] == (2,) and seen[2][2] == (4,)
    # The residuals come from the stored products: no final product.
    assert res.restarts == 1 and res.n_matvecs == seen[-1][1] == 14


def test_check_every_and_final_product_options(problem):
    matrix, eigenvalues, _ = problem
    want = torch.tensor([30.0, 20.0, 15.0], dtype=torch.float64)
    seen = []
    res = block_lanczos(
        matrix, DIM, 3, tol=1e-10, block_size=2, check_every=4, callback=lambda c: seen.append(c)
    )
    assert (res.eigenvalues - want).abs().max() <= 1e-9 * 30
    assert all(c.basis_columns % 8 == 0 or c.basis_columns == res.basis_size for c in seen)
    stored = block_lanczos(matrix, DIM, 3, tol=1e-10, block_size=2)
    measured = block_lanczos(matrix, DIM, 3, tol=1e-10, block_size=2, store_products=False)
    # Same iterations; the product of the k vectors comes on top, the residuals agree.
    assert measured.n_matvecs == stored.n_matvecs + 3
    torch.testing.assert_close(measured.eigenvalues, stored.eigenvalues, rtol=0, atol=1e-12)
    torch.testing.assert_close(measured.residuals, stored.residuals, rtol=1e-3, atol=1e-14)


def test_same_seed_same_bits(problem):
    matrix, _, _ = problem
    first = block_lanczos(matrix.float(), DIM, 4, block_size=3, basis_size=15, seed=7)
    again = block_lanczos(matrix.float(), DIM, 4, block_size=3, basis_size=15, seed=7)
    other = block_lanczos(matrix.float(), DIM, 4, block_size=3, basis_size=15, seed=8)
    assert torch.equal(first.eigenvectors, again.eigenvectors)
    assert torch.equal(first.eigenvalues, again.eigenvalues)
    assert torch.equal(first.residuals, again.residuals)
    assert first.n_matvecs == again.n_matvecs
    assert not torch.equal(first.eigenvectors, other.eigenvectors)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_product_raises(problem, bad):
    matrix, _, _ = problem
    calls = []

    def poisoned(block):
        calls.append(1)
        out = matrix.float() @ block
        if len(calls) == 3:
            out[5, 1] = bad
        return out

    with pytest.raises(FloatingPointError, match=r"restart cycle 0, block 2"):
        block_lanczos(poisoned, DIM, 4, block_size=2)


@pytest.mark.parametrize(
    "options, poisoned_call",
    [
        # Flags read after 6 blocks: the deficient block 3 is found then, blocks 4 and 5 are
        # discarded, block 3 repaired, and every later step is checked at once: call 7
        # redoes block 4.
        ({"check_every": 6, "orthogonalization": "two_pass"}, 7),
        # The defaults read the flags after every block: block 4 is call 5.
        ({}, 5),
    ],
)
def test_non_finite_product_after_rank_repair(make_spectrum_matrix, options, poisoned_call):
    # Rank 12, b = 4, fp32 (the rank test then has a 100x margin over rounding noise): the
    # product of block 3 lies in span(start block, range of H) and must be repaired.
    gen = torch.Generator().manual_seed(4)
    eigenvalues = torch.zeros(DIM, dtype=torch.float64)
    eigenvalues[:12] = 1.0 + 9.0 * torch.rand(12, generator=gen, dtype=torch.float64)
    matrix = make_spectrum_matrix(eigenvalues, seed=5)[0].float()
    calls = []

    def poisoned(block):
        calls.append(1)
        out = matrix @ block
        if len(calls) == poisoned_call:
            out[0, 0] = float("nan")
        return out

    with pytest.raises(FloatingPointError, match=r"restart cycle 0, block 4 \(basis columns 16:20"):
        block_lanczos(poisoned, DIM, 5, block_size=4, **options)
    assert len(calls) == poisoned_call


def test_non_finite_product_on_the_direct_path():
    with pytest.raises(FloatingPointError, match="directly"):
        block_lanczos(lambda x: x * float("nan"), 10, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "0 < k < dim"),
        ({"k": -2}, "0 < k < dim"),
        ({"k": DIM}, "0 < k < dim"),
        ({"k": DIM + 5}, "0 < k < dim"),
        ({"k": 2.0}, "0 < k < dim"),
        ({"which": "LR"}, "which must be one of"),
        ({"tol": 0.0}, r"tol must be a number in \(0, 1\)"),
        ({"tol": -1e-3}, r"tol must be"),
        ({"tol": float("nan")}, r"tol must be"),
        ({"tol": 1.0}, r"tol must be"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"basis_size": 4}, "basis_size must hold"),
        ({"max_matvecs": 0}, "max_matvecs must be a positive integer"),
        ({"max_matvecs": 5, "block_size": 8}, "leaves no room for one block of 8"),
        ({"max_matvecs": 4, "store_products": False}, "plus the final residual product"),
        ({"check_every": 0}, "check_every must be a positive integer"),
        ({"orthogonalization": "mgs"}, "orthogonalization must be one of"),
    ],
)
def test_bad_arguments(problem, kwargs, message):
    matrix, _, _ = problem
    args = {"k": 4, **kwargs}
    k = args.pop("k")
    with pytest.raises(ValueError, match=message):
        block_lanczos(matrix, DIM, k, **args)


def test_bad_operator_types_and_shapes(problem):
    matrix, _, _ = problem
    with pytest.raises(ValueError, match="must be 397 x 397"):
        block_lanczos(matrix[:-1], DIM, 3)
    with pytest.raises(ValueError, match="same shape"):
        block_lanczos(lambda x: x[:-1], DIM, 3)
    with pytest.raises(TypeError, match="callable"):
        block_lanczos(42, DIM, 3)
    with pytest.raises(ValueError, match="dim must be"):
        block_lanczos(matrix, 1, 1)


@pytest.mark.parametrize("dim", [DIM, 20], ids=["krylov", "direct"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex128])
def test_matrix_operator_must_be_floating_point(dim, dtype):
    """An integer matrix applied in its own dtype truncated every unit-norm basis vector to
    zeros: the eigenvalues of diag(0..99) came back as [0, 0]."""
    matrix = torch.diag(torch.arange(dim)).to(dtype)
    message = rf"floating dtype, float32 or float64 \(got {dtype}\).*\.float\(\) or \.double"
    with pytest.raises(TypeError, match=message):
        block_lanczos(matrix, dim, 2)
    if dtype in (torch.int64, torch.int32):  # small integers convert exactly
        res = block_lanczos(matrix.double(), dim, 2, tol=1e-10)
        assert res.eigenvalues.tolist() == pytest.approx([dim - 1.0, dim - 2.0], rel=1e-8)


@pytest.mark.parametrize("seed", ["a", 1.5, 1.0, None, True], ids=repr)
def test_seed_must_be_an_int(problem, seed):
    """torch refused a string or a float with 'manual_seed expected a long'."""
    matrix, _, _ = problem
    with pytest.raises(TypeError, match=f"seed must be an int, got {re.escape(repr(seed))}"):
        block_lanczos(matrix, DIM, 3, seed=seed)
    with pytest.raises(ValueError, match=r"seed must lie in \[-2\*\*63, 2\*\*64\)"):
        block_lanczos(matrix, DIM, 3, seed=2**64)


@pytest.mark.parametrize("block_size", [1, 3])
def test_non_symmetric_operator_is_rejected(problem, block_size):
    matrix, _, _ = problem
    gen = torch.Generator().manual_seed(9)
    skewed = matrix + 0.5 * torch.randn(DIM, DIM, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="not symmetric"):
        block_lanczos(skewed, DIM, 3, block_size=block_size)
    with pytest.raises(ValueError, match="not symmetric"):
        block_lanczos(skewed[:20, :20], 20, 3)  # direct path


def test_max_matvecs_reached(make_spectrum_matrix):
    # A clustered top (1, 0.999, ...) converges slowly: the cap is hit first.
    eigenvalues = torch.linspace(0, 1, DIM, dtype=torch.float64)
    matrix, _ = make_spectrum_matrix(eigenvalues, seed=10)
    res = block_lanczos(matrix.float(), DIM, 4, tol=1e-6, max_matvecs=40)
    assert res.n_matvecs <= 40
    assert not res.all_converged
    assert res.converged.dtype == torch.bool and res.converged.shape == (4,)
    assert torch.isfinite(res.eigenvalues).all() and torch.isfinite(res.residuals).all()
    with pytest.raises(ValueError, match="forms the operator"):
        block_lanczos(matrix[:12, :12], 12, 3, max_matvecs=10)


class _WithMatmat:
    def __init__(self, matrix):
        self.matrix = matrix
        self.dtype = matrix.dtype
        self.device = matrix.device

    def matmat(self, block):
        return self.matrix @ block


class _WithMatmulOnly:
    def __init__(self, matrix):
        self.matrix = matrix

    def __matmul__(self, block):
        return self.matrix @ block


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("kind", ["dense", "callable", "sparse_coo", "sparse_csr", "matmat", "at"])
def test_operator_kinds(problem, kind):
    matrix, eigenvalues, _ = problem
    dense = matrix.float()
    dense = torch.where(dense.abs() < 1e-3, torch.zeros_like(dense), dense)  # some sparsity
    operator = {
        "dense": lambda: dense,
        "callable": lambda: lambda block: dense @ block,
        "sparse_coo": lambda: dense.to_sparse(),
        "sparse_csr": lambda: dense.to_sparse_csr(),
        "matmat": lambda: _WithMatmat(dense),
        "at": lambda: _WithMatmulOnly(dense),
    }[kind]()
    res = block_lanczos(operator, DIM, 3, tol=1e-5)
    want = torch.linalg.eigvalsh(dense.double()).flip(0)[:3]
    assert res.eigenvectors.dtype == torch.float32
    assert (res.eigenvalues - want).abs().max() / 30.0 <= 1e-5


def test_fp64_matrix_with_fp32_basis(problem):
    matrix, eigenvalues, _ = problem
    res = block_lanczos(matrix, DIM, 3, dtype=torch.float32, tol=1e-5)
    assert res.eigenvectors.dtype == torch.float32
    assert (
        res.eigenvalues - torch.tensor([30.0, 20.0, 15.0], dtype=torch.float64)
    ).abs().max() < 1e-4


def test_progress_bar_runs(problem, capsys):
    matrix, _, _ = problem
    res = block_lanczos(matrix.float(), DIM, 2, progress=True)
    assert res.all_converged
    assert "matvec" in capsys.readouterr().err


def test_defaults():
    # CPU: single vectors up to k = 16, then blocks of 4 and 16.
    assert [bl_module.default_block_size(k) for k in (1, 10, 16, 17, 32, 64, 65)] == [
        1,
        1,
        1,
        4,
        4,
        4,
        16,
    ]
    # GPU: min(k, 16).
    assert [bl_module.default_block_size(k, "cuda") for k in (1, 10, 40)] == [1, 10, 16]
    assert bl_module.default_basis_size(1, 1) == 20  # max(2k + 10, 20)
    assert bl_module.default_basis_size(10, 1) == 30
    assert bl_module.default_basis_size(10, 10) == 50  # max(40, 50)
    assert bl_module.default_basis_size(40, 16) == 160  # max(160, 104)
    assert bl_module.default_basis_size(5, 3) == 21  # max(20, 17) -> multiple of 3
    # Convergence checks: every block on the CPU, once per restart cycle elsewhere.
    assert bl_module.default_check_every("cpu", 50, 10) == 1
    assert bl_module.default_check_every("cuda", 50, 10) == 5
    assert bl_module.default_check_every(torch.device("cuda", 1), 160, 16) == 10
    assert bl_module.default_check_every("cuda", 5, 8) == 1


def test_checks_once_per_cycle_with_the_gpu_default(problem):
    """The GPU default (a whole cycle between checks), run here on the CPU: one convergence
    check, hence one host synchronization, per restart cycle, always with the basis full;
    the answer is the same as with a check after every block."""
    matrix, eigenvalues, _ = problem
    every = bl_module.default_check_every("cuda", 12, 2)
    seen = []
    res = block_lanczos(
        matrix,
        DIM,
        4,
        tol=1e-9,
        block_size=2,
        basis_size=12,
        check_every=every,
        callback=lambda c: seen.append((c.cycle, c.basis_columns)),
    )
    cycles = [cycle for cycle, _ in seen]
    assert cycles == sorted(set(cycles)) and len(seen) == res.restarts + 1
    assert all(columns == 12 for _, columns in seen)
    per_block = block_lanczos(matrix, DIM, 4, tol=1e-9, block_size=2, basis_size=12)
    torch.testing.assert_close(res.eigenvalues, per_block.eigenvalues, rtol=0, atol=1e-10 * 30)
    assert res.n_matvecs >= per_block.n_matvecs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_locked", [0, 2])
def test_expand_block_writes_relation(problem, dtype, n_locked):
    matrix, _, _ = problem
    matrix = matrix.to(dtype)
    b, start = 3, 6
    gen = torch.Generator().manual_seed(11)
    basis = torch.full((DIM, 16), float("nan"), dtype=dtype)  # poisoned: all must be written
    q, _ = torch.linalg.qr(torch.randn(DIM, start + b, generator=gen, dtype=torch.float64))
    basis[:, : start + b] = q.to(dtype)
    projected = torch.full((16, 16), float("nan"), dtype=torch.float64)
    product = matrix @ basis[:, start : start + b]
    want = product.double().clone()  # expand_block overwrites the product
    flags = expand_block(basis, projected, start, product, n_locked=n_locked)
    assert flags.tolist() == [False, False]
    end = start + b
    new = basis[:, end : end + b]
    coeffs = projected[:end, start:end]
    coupling = projected[end : end + b, start:end]
    assert torch.isfinite(new).all() and torch.isfinite(coeffs).all()
    assert torch.isfinite(coupling).all()
    eps = torch.finfo(dtype).eps
    v = basis[:, : end + b].double()
    assert (v.T @ v - torch.eye(end + b, dtype=torch.float64)).abs().max() <= 20 * eps
    if n_locked:
        assert coeffs[:n_locked].abs().max() == 0
        want = want - basis[:, :n_locked].double() @ (basis[:, :n_locked].double().T @ want)
    rebuilt = basis[:, :end].double() @ coeffs + new.double() @ coupling
    assert (rebuilt - want).abs().max() <= 100 * eps * 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expand_block_with_local_pass_writes_the_same_relation(problem, dtype):
    # The adaptive step: the previous and the current block first (passed as a contiguous
    # copy), then one full projection; T and Q_{j+1} must satisfy H Q_j = V C + Q B as with
    # two full passes, and the basis stay orthonormal.
    matrix, _, _ = problem
    matrix = matrix.to(dtype)
    b, start = 2, 8
    gen = torch.Generator().manual_seed(13)
    v0 = torch.randn(DIM, b, generator=gen, dtype=torch.float64)
    basis = torch.full((DIM, 16), float("nan"), dtype=dtype)
    # A genuine Krylov basis, so the local pass holds most of H Q_j.
    q, _ = torch.linalg.qr(
        torch.cat([torch.linalg.matrix_power(matrix.double(), i) @ v0 for i in range(5)], 1)
    )
    basis[:, : start + b] = q.to(dtype)
    product = matrix @ basis[:, start : start + b]
    want = product.double().clone()
    projected = torch.zeros(16, 16, dtype=torch.float64)
    flags = expand_block(
        basis,
        projected,
        start,
        product,
        local_start=start - b,
        second_projection="auto",
        local=basis[:, start - b : start + b].clone(),
    )
    assert flags.tolist() == [False, False]
    end = start + b
    eps = torch.finfo(dtype).eps
    v = basis[:, : end + b].double()
    assert (v.T @ v - torch.eye(end + b, dtype=torch.float64)).abs().max() <= 20 * eps
    rebuilt = basis[:, :end].double() @ projected[:end, start:end] + (
        basis[:, end : end + b].double() @ projected[end : end + b, start:end]
    )
    assert (rebuilt - want).abs().max() <= 100 * eps * 30


def test_expand_block_flags_invariant_subspace():
    gen = torch.Generator().manual_seed(12)
    q, _ = torch.linalg.qr(torch.randn(100, 8, generator=gen, dtype=torch.float64))
    basis = torch.zeros(100, 12, dtype=torch.float64)
    basis[:, :8] = q
    projected = torch.zeros(12, 12, dtype=torch.float64)
    product = q @ torch.randn(8, 4, generator=gen, dtype=torch.float64)  # inside span(V)
    raw = product - q @ (q.T @ product)
    flags = expand_block(basis, projected, 4, product)
    assert flags.tolist() == [False, True]
    # The raw residual is kept for the repair, with zero coupling.
    torch.testing.assert_close(basis[:, 8:12], raw, rtol=0, atol=1e-13)
    assert projected[8:12, 4:8].abs().max() == 0


def test_rank_tolerance_default():
    assert orthogonalize.default_rank_tol(torch.float32) == pytest.approx(1.19e-5, rel=0.01)


@pytest.mark.gpu
def test_cuda_same_bits_and_no_sync_in_expand_block(problem):
    matrix, eigenvalues, _ = problem
    cuda = matrix.float().cuda()
    first = block_lanczos(cuda, DIM, 4, block_size=3, seed=3)
    again = block_lanczos(cuda, DIM, 4, block_size=3, seed=3)
    assert first.eigenvectors.is_cuda
    assert torch.equal(first.eigenvectors, again.eigenvectors)
    assert (first.eigenvalues.cpu() - torch.tensor([30.0, 20.0, 15.0, 12.0])).abs().max() < 1e-3
    basis = torch.linalg.qr(torch.randn(DIM, 6, device="cuda"))[0]
    storage = torch.zeros(DIM, 9, device="cuda")
    storage[:, :6] = basis
    projected = torch.zeros(9, 9, dtype=torch.float64, device="cuda")
    product = cuda @ storage[:, 3:6]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        expand_block(storage, projected, 3, product)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_default_checks_once_per_cycle(problem):
    """On a GPU the default convergence check (one host synchronization) comes once per
    restart cycle, with the basis full."""
    matrix, _, _ = problem
    seen = []
    res = block_lanczos(
        matrix.float().cuda(),
        DIM,
        4,
        block_size=2,
        basis_size=12,
        callback=lambda c: seen.append((c.cycle, c.basis_columns)),
    )
    assert len(seen) == res.restarts + 1
    assert all(columns == 12 for _, columns in seen)


@pytest.mark.parametrize("layout", ["row_major_slice", "column_major"])
@pytest.mark.parametrize("chunk", [7, 8192])
def test_rotate_in_place_matches_the_out_of_place_product(monkeypatch, layout, chunk):
    # Restarts rotate the basis and the stored products in place, a chunk of rows at a time;
    # the result must be the product of the old contents, whatever the chunking and layout,
    # the Gram must be that of the stored result, and nothing outside [:, :k] may change.
    monkeypatch.setattr(bl_module, "_ROTATION_CHUNK", chunk)
    gen = torch.Generator().manual_seed(5)
    n, m, k, width = 1001, 9, 5, 13
    if layout == "row_major_slice":
        buffer = torch.randn(n, width, generator=gen)
        view = buffer[:, :m]
    else:
        buffer = torch.randn(width, n, generator=gen)
        view = buffer[:m].T
    before = buffer.clone()
    old = view.double().clone()
    s = torch.randn(m, k, generator=gen)
    gram = bl_module._rotate_in_place(view, s, gram=True)
    expected = old @ s.double()
    # fp32 GEMM of length m: within gamma_m |V| |S| of the exact product.
    bound = 2 * m * torch.finfo(torch.float32).eps * (old.abs() @ s.double().abs())
    assert ((view[:, :k].double() - expected).abs() <= bound).all()
    stored = view[:, :k].double()
    assert torch.allclose(gram, stored.T @ stored, rtol=1e-12, atol=0.0)
    untouched = torch.ones_like(buffer, dtype=torch.bool)
    if layout == "row_major_slice":
        untouched[:, :k] = False
    else:
        untouched[:k] = False
    assert torch.equal(buffer[untouched], before[untouched])


def test_restarts_with_small_rotation_chunks_agree(monkeypatch, problem):
    # Many restarts with chunks far smaller than n (and not dividing it): the same answer
    # as the default single-chunk rotation at this size, to fp32 rounding.
    matrix, eigenvalues, _ = problem
    options = dict(which="SA", block_size=2, basis_size=12, tol=1e-5)
    whole = block_lanczos(matrix.float(), DIM, 4, **options)
    monkeypatch.setattr(bl_module, "_ROTATION_CHUNK", 10)
    chunked = block_lanczos(matrix.float(), DIM, 4, **options)
    assert whole.restarts >= 3 and chunked.all_converged
    scale = eigenvalues.abs().max()
    assert (chunked.eigenvalues - whole.eigenvalues).abs().max() <= 1e-5 * scale
    assert (chunked.residuals - whole.residuals).abs().max() <= 1e-5
    vectors = chunked.eigenvectors.double()
    assert (vectors.T @ vectors - torch.eye(4, dtype=torch.float64)).abs().max() <= 1e-6


def _true_residuals(matrix, res):
    vectors = res.eigenvectors.double()
    products = matrix.double() @ vectors - vectors * res.eigenvalues.double()
    return torch.linalg.vector_norm(products, dim=0) / res.h_norm


@pytest.mark.parametrize("case", ["multiplicity", "rank_loss"])
def test_stored_products_are_those_of_the_basis(make_spectrum_matrix, case):
    # The adaptive path hands each product the contiguous copy of the block it just wrote;
    # after a rank repair (new directions in the basis) or a verification restart (a random
    # block) that copy is stale and the block must be read from the basis again. A stale
    # input would pair H(stale) with the basis vector in the stored products, and the
    # residuals measured from them would no longer be the true ones.
    gen = torch.Generator().manual_seed(8)
    if case == "multiplicity":
        head = torch.tensor([10.0] * 5 + [8.0, 7.0], dtype=torch.float64)
        eigenvalues = torch.cat(
            [head, 5.0 * torch.rand(DIM - 7, generator=gen, dtype=torch.float64)]
        )
        matrix, _ = make_spectrum_matrix(eigenvalues, seed=3)
        res = block_lanczos(matrix, DIM, 7, block_size=2, tol=1e-10)
    else:
        nonzero = 1.0 + 9.0 * torch.rand(12, generator=gen, dtype=torch.float64)
        eigenvalues = torch.cat([nonzero, torch.zeros(DIM - 12, dtype=torch.float64)])
        matrix, _ = make_spectrum_matrix(eigenvalues, seed=5)
        res = block_lanczos(matrix, DIM, 5, which="SA", block_size=4, tol=1e-10)
    assert res.all_converged and res.restarts >= 1
    assert (res.residuals - _true_residuals(matrix, res)).abs().max() <= 1e-12
