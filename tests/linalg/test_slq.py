"""Stochastic Lanczos quadrature on operators with known spectra."""

import math
import re

import pytest
import torch

from imc_kernels.linalg import cumulative_count, density_on_grid, slq

DIM = 499  # awkward size
SPECTRUM = torch.cat(
    [torch.linspace(-1.0, 3.0, DIM - 2, dtype=torch.float64), torch.tensor([10.0, 20.0])]
)


def _diag(dtype):
    return torch.diag(SPECTRUM).to(dtype)


def _moment(res, power):
    """Per-probe quadrature of x**power: sum_j w_pj theta_pj**power."""
    return (res.weights * res.nodes.pow(power)).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reorthogonalize", [False, True])
@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_weights_sum_to_one_and_nodes_in_spectrum(dtype, reorthogonalize, probes):
    res = slq(
        _diag(dtype), DIM, n_probes=5, steps=30, reorthogonalize=reorthogonalize, probes=probes
    )
    assert res.nodes.shape == (5, 30) and res.weights.shape == (5, 30)
    assert res.nodes.dtype == torch.float64 and res.n_matvecs == 5 * 30
    # Weights: squared first components of an fp64 orthogonal eigenvector matrix.
    torch.testing.assert_close(
        res.weights.sum(1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert (res.weights >= 0).all()
    # Ritz values lie in the spectrum's hull; a finite-precision run is the exact run of a
    # perturbation of size ~u ||H|| per step (Paige), hence the margin: 1e-4 ||H|| in fp32.
    margin = (1e-4 if dtype == torch.float32 else 1e-10) * 20.0
    assert res.nodes.min() >= -1.0 - margin and res.nodes.max() <= 20.0 + margin
    # The outliers are resolved by 30 steps.
    assert (res.nodes.max(1).values - 20.0).abs().max() <= margin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_exact_for_diagonal_operator_and_rademacher_probes(dtype):
    # q = z / sqrt(n) with z_i = +-1: q^T A^p q = tr(A^p) / n exactly for diagonal A, and a
    # Gauss rule with >= 2 nodes integrates x and x^2 exactly. What remains is rounding: the
    # fp32 recurrence reproduces the moments to ~u * ||H||^p * (a few steps), so 1e-5
    # relative; fp64 to 1e-12.
    res = slq(_diag(dtype), DIM, n_probes=4, steps=12)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for power in (1, 2):
        want = SPECTRUM.pow(power).mean().item()
        scale = SPECTRUM.abs().max().item() ** power
        assert (_moment(res, power) - want).abs().max() <= tol * scale


def test_moments_gaussian_probes_within_statistical_error(make_spectrum_matrix):
    # q uniform on the sphere: E[q^T A^p q] = tr(A^p) / n, and
    # Var[q^T M q] = 2 / (n + 2) * (mean(mu^2) - mean(mu)^2) for M with eigenvalues mu.
    # The mean over P probes has std sqrt(Var / P); 5 std bounds a false failure by 6e-7.
    matrix, _ = make_spectrum_matrix(SPECTRUM, seed=21)
    n_probes = 16
    res = slq(matrix, DIM, n_probes=n_probes, steps=10, probes="gaussian", seed=3)
    for power in (1, 2):
        mu = SPECTRUM.pow(power)
        var = 2.0 / (DIM + 2) * (mu.square().mean() - mu.mean().square()).item()
        error = abs(_moment(res, power).mean().item() - mu.mean().item())
        assert error <= 5 * math.sqrt(var / n_probes)


def test_reorthogonalized_and_plain_give_close_densities():
    # 80 fp32 steps with well-separated outliers: the plain recurrence loses orthogonality
    # and produces ghost copies of 10 and 20, but the quadrature splits their weight among
    # the copies (Greenbaum), so the smoothed densities stay close.
    plain = slq(_diag(torch.float32), DIM, n_probes=4, steps=80, seed=5)
    reorth = slq(_diag(torch.float32), DIM, n_probes=4, steps=80, seed=5, reorthogonalize=True)
    grid = torch.linspace(-2.0, 21.0, 2000, dtype=torch.float64)
    sigma = 0.1
    _, dens_plain, cdf_plain = density_on_grid(plain.nodes, plain.weights, grid, sigma)
    _, dens_reorth, cdf_reorth = density_on_grid(reorth.nodes, reorth.weights, grid, sigma)
    # L1 distance of two densities is at most 2; measured ~1e-5 here, 1e-3 allows noise.
    assert torch.trapezoid((dens_plain - dens_reorth).abs(), grid) <= 1e-3
    assert (cdf_plain - cdf_reorth).abs().max() <= 1e-3


def test_breakdown_truncates_the_tridiagonal():
    # Three distinct eigenvalues: each probe's Krylov space is invariant after 3 steps.
    values = torch.cat(
        [torch.full((100,), -1.0), torch.full((150,), 0.5), torch.full((249,), 2.0)]
    ).double()
    res = slq(torch.diag(values), DIM, n_probes=3, steps=20)
    assert res.lengths.tolist() == [3, 3, 3]
    assert (res.weights[:, 3:] == 0).all() and (res.alphas[:, 3:] == 0).all()
    torch.testing.assert_close(
        res.nodes[:, :3],
        torch.tensor([[-1.0, 0.5, 2.0]] * 3, dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    # Rademacher on a diagonal operator: the weight of each eigenvalue is its multiplicity / n.
    want = torch.tensor([100, 150, 249], dtype=torch.float64) / DIM
    torch.testing.assert_close(res.weights[:, :3], want.expand(3, 3), rtol=0, atol=1e-12)


def test_steps_beyond_dim_are_padding():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(10, generator=gen, dtype=torch.float64)
    res = slq(torch.diag(values), 10, n_probes=2, steps=25)
    assert res.nodes.shape == (2, 25) and (res.lengths <= 10).all()
    assert res.n_matvecs == 2 * 10
    torch.testing.assert_close(res.weights.sum(1), torch.ones(2, dtype=torch.float64))


def test_density_integrates_to_one_and_cdf_ends_at_one():
    res = slq(_diag(torch.float64), DIM, n_probes=4, steps=40)
    grid, density, cdf = density_on_grid(res.nodes, res.weights)
    assert grid.shape == density.shape == cdf.shape == (1000,)
    assert (density >= 0).all()
    # The default grid reaches 5 sigma past the extreme nodes: mass outside is 6e-7.
    assert abs(torch.trapezoid(density, grid).item() - 1.0) <= 1e-3
    assert cdf[0] == 0 and cdf[-1] == 1 and (cdf.diff() >= 0).all()
    # A truncated user grid: the density is left as is, the cdf still normalized.
    grid2, density2, cdf2 = density_on_grid(res.nodes, res.weights, grid=torch.linspace(0, 1, 50))
    assert torch.trapezoid(density2, grid2) < 0.5 and cdf2[-1] == 1


def test_cumulative_count_brackets_the_true_count():
    # Chebyshev-Markov-Stieltjes: a Gauss rule's cdf differs from the measure's cdf by at most
    # the weight of one node. Rademacher probes on a diagonal operator make each probe's
    # measure the uniform spectral measure, so the bound is deterministic.
    res = slq(_diag(torch.float64), DIM, n_probes=3, steps=25)
    for x in (-0.5, 0.7, 2.9, 15.0):
        true = (SPECTRUM <= x).double().mean().item()
        per_probe = torch.stack(
            [cumulative_count(res.nodes[p], res.weights[p], x) for p in range(3)]
        )
        slack = res.weights.max().item() + 1e-12
        assert (per_probe - true).abs().max() <= slack
    counts = cumulative_count(res.nodes, res.weights, torch.tensor([-5.0, 25.0]), dim=DIM)
    torch.testing.assert_close(counts, torch.tensor([0.0, float(DIM)], dtype=torch.float64))
    smooth = cumulative_count(res.nodes, res.weights, torch.tensor([-5.0, 25.0]), sigma=0.1)
    torch.testing.assert_close(smooth, torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_same_seed_same_bits_and_operator_kinds():
    # Gaussian probes: with Rademacher probes a diagonal operator's quadrature does not
    # depend on the signs at all, so another seed would give the same bits.
    matrix = _diag(torch.float32)
    kw = {"n_probes": 3, "steps": 15, "probes": "gaussian"}
    first = slq(matrix, DIM, seed=4, **kw)
    again = slq(lambda block: matrix @ block, DIM, seed=4, **kw)
    sparse = slq(matrix.to_sparse(), DIM, seed=4, **kw)
    other = slq(matrix, DIM, seed=5, **kw)
    assert torch.equal(first.nodes, again.nodes) and torch.equal(first.weights, again.weights)
    torch.testing.assert_close(first.nodes, sparse.nodes, rtol=0, atol=1e-4)
    assert not torch.equal(first.nodes, other.nodes)


def test_non_finite_product_raises():
    calls = []

    def poisoned(block):
        calls.append(1)
        out = block.clone()
        if len(calls) == 4:
            out[3, 0] = float("inf")
        return out

    with pytest.raises(FloatingPointError, match="Lanczos step 3"):
        slq(poisoned, 50, n_probes=2, steps=10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_probes": 0}, "n_probes must be a positive integer"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"probes": "sobol"}, "probes must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        slq(_diag(torch.float32), DIM, **kwargs)
    with pytest.raises(ValueError, match="sigma must be positive"):
        density_on_grid(torch.zeros(1, 2), torch.full((1, 2), 0.5), sigma=0.0)


def test_matrix_and_seed_types():
    """An integer matrix gave nodes [0, 0, ...] (blocks applied in int64), and a float seed
    torch's 'manual_seed expected a long'."""
    matrix = torch.diag(torch.arange(100))
    with pytest.raises(TypeError, match=r"floating dtype.*\(got torch.int64\)"):
        slq(matrix, 100, n_probes=2, steps=5)
    for seed in ("a", 1.5):
        with pytest.raises(TypeError, match="seed must be an int"):
            slq(matrix.double(), 100, n_probes=2, steps=5, seed=seed)
    res = slq(matrix.double(), 100, n_probes=2, steps=5, seed=3)
    assert res.nodes.max() > 50


NODES, WEIGHTS = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"n_grid": 0}, ValueError, "n_grid must be an integer >= 2, got 0"),
        ({"n_grid": 1}, ValueError, "n_grid must be an integer >= 2, got 1"),
        ({"n_grid": 10.0}, ValueError, "n_grid must be an integer"),
        ({"sigma": float("inf")}, ValueError, "sigma must be positive and finite, got inf"),
        ({"sigma": float("nan")}, ValueError, "sigma must be positive and finite, got nan"),
        ({"sigma": "wide"}, TypeError, "sigma must be a positive real number, got 'wide'"),
        ({"grid": [1.0, -1.0, 0.0, 0.5]}, ValueError, "grid must be sorted ascending"),
        ({"grid": []}, ValueError, "grid is empty"),
        ({"grid": [0.0, float("inf")]}, ValueError, "grid must hold finite points"),
        ({"grid": [0.0, float("nan")]}, ValueError, "grid must not hold NaN"),
        ({"grid": ["a", "b"]}, TypeError, "grid must be a real number or an array"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_density_on_grid_bad_arguments(kwargs, error, message):
    """n_grid=0 was an IndexError, sigma=inf a NaN density, an unsorted grid a cdf that is
    not monotone; each is now an error that names the argument."""
    with pytest.raises(error, match=re.escape(message)):
        density_on_grid(NODES, WEIGHTS, **kwargs)


@pytest.mark.parametrize(
    "x, kwargs, error, message",
    [
        (float("nan"), {}, ValueError, "x must not hold NaN"),
        (torch.tensor([0.5, float("nan")]), {}, ValueError, "x must not hold NaN"),
        ("a", {}, TypeError, "x must be a real number or an array of real numbers, got 'a'"),
        (1 + 2j, {}, TypeError, "x must be a real number"),
        (0.5, {"sigma": float("inf")}, ValueError, "sigma must be positive and finite"),
        (0.5, {"sigma": 0.0}, ValueError, "sigma must be positive and finite"),
    ],
)
def test_cumulative_count_bad_arguments(x, kwargs, error, message):
    """fraction_below(nan) returned 0.0, and a string raised numpy's conversion error."""
    with pytest.raises(error, match=re.escape(message)):
        cumulative_count(NODES, WEIGHTS, x, **kwargs)
    # Infinite thresholds are fine: nothing, or everything, lies below them.
    assert cumulative_count(NODES, WEIGHTS, [-math.inf, math.inf]).tolist() == [0.0, 1.0]
