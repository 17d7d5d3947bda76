"""``top_eigvecs`` and ``spectral_density`` against dense fp64 Hessians of small models.

The oracle: ``torch.func.hessian`` of the loss of a float64 copy of the model in its flat
parameters, then ``torch.linalg.eigh``. Tolerances (errors relative to ||H|| = max |lambda|,
the scale of the solver's ``tol``):

* eigenvalues, float32 model at the default tol = 1e-4: a Ritz value with residual r lies
  within r^2 / gap of an eigenvalue (1e-8 / gap), and the float32 products differ from the
  float64 Hessian by ~1e-7 ||H||; 1e-5 leaves a wide margin and is the issue's figure.
* eigenvalues, float64 model at tol = 1e-10: the same bound gives 1e-10.
* eigenvectors up to sign: sin(angle) <= r / gap (Davis-Kahan), so 10 tol ||H|| / gap; within
  an exact cluster the same bound holds for the principal angles between the subspaces.
* SLQ moments: the quadrature is exact for polynomials of degree < 2 steps, so the only error
  is the probes' (Hutchinson): a Rademacher probe gives q^T A q with standard deviation
  sqrt(2) ||A - diag(A)||_F / dim; the tests allow 5 of those, divided by sqrt(n_probes).

Models run with ``engine="func"`` (any model, exact to rounding) except where the default
engine is the point: under ``TRITON_INTERPRET=1`` (tests on CPU) the fused engine's kernels
are interpreted, ~100x slower.
"""

import copy
import math
import re

import pytest
import torch
from torch import nn

import imc_kernels as ik
from imc_kernels.spectral import EigenResult, SpectralDensity


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Many small products: on a shared 2-core machine two OpenMP threads spin against other
    # jobs and run 10-50x slower (measured: a k = 4 solve 0.3 s on one thread, 4 s on two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# Problems and the dense oracle


def _mlp():
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 5))  # 365 weights


def _cnn():
    # 1x8x8 images: conv 3x3 (30) -> tanh -> 3x6x6 -> linear to 4 classes (436): 466 weights.
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))


def _wide():
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 8))  # 1,608 weights


BUILDERS = {
    "mlp": (_mlp, (12,), 5),
    "cnn": (_cnn, (1, 8, 8), 4),
    "wide": (_wide, (16,), 8),
}


def make_problem(name, dtype=torch.float32, seed=0, batch=96):
    build, input_shape, classes = BUILDERS[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build().to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(batch, *input_shape, generator=gen).to(dtype)
    targets = torch.randint(0, classes, (batch,), generator=gen)
    return model, (inputs, targets)


def dense_hessian(model, batch, loss_fn=None):
    """The loss Hessian in the flat parameters, float64, from ``torch.func.hessian``."""
    model64 = _copy64(model)
    names = [n for n, p in model64.named_parameters() if p.requires_grad]
    params = [p.detach() for _, p in model64.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    inputs, targets = batch
    inputs = inputs.double()
    if targets.is_floating_point():
        targets = targets.double()
    if loss_fn is None:
        loss_fn = (
            nn.functional.cross_entropy
            if not targets.is_floating_point()
            else (nn.functional.mse_loss)
        )

    def loss_of(flat):
        pieces = [t.view(s) for t, s in zip(flat.split(sizes), shapes)]
        output = torch.func.functional_call(model64, dict(zip(names, pieces)), (inputs,))
        return loss_fn(output, targets)

    flat = torch.cat([p.reshape(-1) for p in params])
    hessian = torch.func.hessian(loss_of)(flat)
    return 0.5 * (hessian + hessian.T)


def _copy64(model):
    import copy

    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def oracle():
    """``name, dtype -> (model, batch, H, eigenvalues, eigenvectors)``, cached."""
    cache = {}

    def get(name, dtype=torch.float32):
        if (name, dtype) not in cache:
            model, batch = make_problem(name, dtype)
            hessian = dense_hessian(model, batch)
            values, vectors = torch.linalg.eigh(hessian)
            cache[name, dtype] = (model, batch, hessian, values, vectors)
        return cache[name, dtype]

    return get


def _wanted(values, which, k):
    if which == "LA":
        order = torch.argsort(values, descending=True)
    elif which == "SA":
        order = torch.argsort(values)
    else:
        order = torch.argsort(values.abs(), descending=True)
    return order[:k]


def _sines(computed, reference):
    """Sines of the principal angles between two column spaces (accurate for small angles)."""
    q1, _ = torch.linalg.qr(computed.double())
    q2, _ = torch.linalg.qr(reference.double())
    return torch.linalg.svdvals(q1 - q2 @ (q2.T @ q1))


def _clusters(values, wanted, h_norm, rtol=1e-3):
    """Groups of wanted indices whose eigenvalues lie within ``rtol ||H||`` of each other,
    each with its gap to every other eigenvalue of the spectrum."""
    groups = []
    for index in wanted.tolist():
        for group in groups:
            if abs(values[index] - values[group[0]]) <= rtol * h_norm:
                group.append(index)
                break
        else:
            groups.append([index])
    out = []
    for group in groups:
        inside = torch.zeros_like(values, dtype=torch.bool)
        inside[group] = True
        gap = (values[~inside][:, None] - values[group][None, :]).abs().min()
        out.append((group, float(gap)))
    return out


def check_against_dense(res, values, vectors, hessian, which, tol, value_tol):
    k = res.eigenvalues.numel()
    h_norm = float(values.abs().max())
    wanted = _wanted(values, which, k)
    assert res.eigenvalues.dtype == torch.float64 and res.eigenvalues.shape == (k,)
    err = (res.eigenvalues.cpu() - values[wanted]).abs().max() / h_norm
    assert err <= value_tol, f"eigenvalue error {float(err):.2e} > {value_tol:g}"
    computed = res.eigenvectors.double().cpu()
    # Orthonormal columns.
    gram = computed.T @ computed - torch.eye(k, dtype=torch.float64)
    assert gram.abs().max() <= 10 * tol
    # Eigenvectors up to sign (clusters up to rotation), Davis-Kahan with the true gap.
    for group, gap in _clusters(values, wanted, h_norm):
        columns = [wanted.tolist().index(i) for i in group]
        sines = _sines(computed[:, columns], vectors[:, group])
        assert sines.max() <= 10 * tol * h_norm / gap, (group, float(sines.max()), gap)
    # The reported residuals are the true ones (relative to ||H||_est, close to ||H||).
    true = torch.linalg.vector_norm(hessian @ computed - computed * res.eigenvalues.cpu(), dim=0)
    torch.testing.assert_close(res.residuals.cpu(), true / res.h_norm, rtol=0.05, atol=2e-6)
    assert res.residuals.max() <= 10 * tol


# --------------------------------------------------------------------------------------
# top_eigvecs


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_top_eigvecs_fp32_matches_dense_eigh(oracle, name, which):
    model, batch, hessian, values, vectors = oracle(name)
    res = ik.top_eigvecs(model, batch, 4, which=which, engine="func")
    assert isinstance(res, EigenResult) and res.all_converged and res.which == which
    assert res.eigenvectors.dtype == torch.float32 and res.eigenvectors.shape == (
        hessian.shape[0],
        4,
    )
    check_against_dense(res, values, vectors, hessian, which, tol=1e-4, value_tol=1e-5)
    if which == "LA":
        assert torch.all(res.eigenvalues[:-1] >= res.eigenvalues[1:])
    elif which == "SA":
        assert torch.all(res.eigenvalues[:-1] <= res.eigenvalues[1:])
    else:
        assert torch.all(res.eigenvalues.abs()[:-1] >= res.eigenvalues.abs()[1:])


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_top_eigvecs_fp64_model_matches_to_1e10(oracle, which):
    model, batch, hessian, values, vectors = oracle("mlp", torch.float64)
    res = ik.top_eigvecs(model, batch, 5, which=which, tol=1e-10, engine="func")
    assert res.all_converged and res.eigenvectors.dtype == torch.float64
    check_against_dense(res, values, vectors, hessian, which, tol=1e-10, value_tol=1e-10)


def test_top_eigvecs_default_engine_and_larger_model(oracle):
    # The default path end to end (engine "auto" picks the fused engine for this Sequential;
    # interpreted Triton here) on the 1,608-weight model, k = 10 as in the benchmark.
    model, batch, hessian, values, vectors = oracle("wide")
    res = ik.top_eigvecs(model, batch, 10)
    assert res.operator.engine == "fused"
    assert res.all_converged
    check_against_dense(res, values, vectors, hessian, "LA", tol=1e-4, value_tol=1e-5)
    # Counted at the operator: every product the solver asked for, nothing else.
    assert res.n_hvps == res.operator.n_products


def test_exact_clusters_resolved_by_subspace(oracle):
    # Linear regression with MSE: H = kron(2 X^T X / (N c), I_c) in (weight, bias) order up to
    # a permutation, so every eigenvalue has multiplicity c = 3 exactly. A block of 3 holds
    # each eigenspace; the eigenvectors are compared as subspaces.
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(7, 3)).double()
    inputs = torch.randn(64, 7, generator=gen, dtype=torch.float64) * torch.linspace(
        0.5, 3.0, 7, dtype=torch.float64
    )
    batch = (inputs, torch.randn(64, 3, generator=gen, dtype=torch.float64))
    hessian = dense_hessian(model, batch)
    values, vectors = torch.linalg.eigh(hessian)
    # Top two triples: sanity of the construction.
    top = values.flip(0)[:6]
    assert (top[:3] - top[0]).abs().max() <= 1e-12 * top[0]
    assert top[2] - top[3] > 0.05 * top[0]
    res = ik.top_eigvecs(model, batch, 6, tol=1e-10, block_size=3, engine="func")
    check_against_dense(res, values, vectors, hessian, "LA", tol=1e-10, value_tol=1e-10)
    torch.testing.assert_close(res.eigenvalues[:3], top[:3], rtol=1e-10, atol=0)


def test_as_params_shapes_and_values(oracle):
    model, batch, _, _, _ = oracle("cnn")
    res = ik.top_eigvecs(model, batch, 2, engine="func")
    for i in (0, 1, -1):
        pieces = res.as_params(i)
        assert list(pieces) == [name for name, _ in model.named_parameters()]
        for param, piece in zip(model.parameters(), pieces.values()):
            assert piece.shape == param.shape and piece.dtype == param.dtype
        flat = torch.cat([p.reshape(-1) for p in pieces.values()])
        assert torch.equal(flat, res.eigenvectors[:, i])
    with pytest.raises(IndexError, match="out of range"):
        res.as_params(2)


def test_accepts_a_ready_operator(oracle):
    model, batch, _, _, _ = oracle("mlp")
    operator = ik.HessianOperator(model, None, batch, engine="func")
    before = operator.n_products
    from_operator = ik.top_eigvecs(operator, None, 3)
    from_model = ik.top_eigvecs(model, batch, 3, engine="func")
    assert from_operator.operator is operator
    assert operator.n_products - before == from_operator.n_hvps
    assert torch.equal(from_operator.eigenvectors, from_model.eigenvectors)
    assert torch.equal(from_operator.eigenvalues, from_model.eigenvalues)
    with pytest.raises(ValueError, match="pass batch=None"):
        ik.top_eigvecs(operator, batch, 3)
    with pytest.raises(ValueError, match="curvature"):
        ik.top_eigvecs(operator, None, 3, curvature="ggn")


def test_ggn_curvature_is_positive_semidefinite(oracle):
    model, batch, _, _, _ = oracle("mlp")
    res = ik.top_eigvecs(model, batch, 3, which="SA", curvature="ggn", engine="func")
    # GGN of cross-entropy is PSD: its smallest eigenvalues are 0 up to rounding.
    assert res.eigenvalues.min() >= -1e-5 * res.h_norm


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"k": 0}, ValueError, "k must be a positive integer"),
        ({"k": -3}, ValueError, "k must be a positive integer"),
        ({"k": 2.0}, ValueError, "k must be a positive integer"),
        ({"k": 365}, ValueError, "smaller than the dimension 365"),
        ({"k": 400}, ValueError, "smaller than the dimension 365"),
        ({"which": "LR"}, ValueError, "which must be one of"),
        ({"which": "la"}, ValueError, "which must be one of"),
        ({"tol": 0.0}, ValueError, "tol must be"),
        ({"max_hvps": 0}, ValueError, "max_matvecs must be a positive integer"),
        ({"block_size": 0}, ValueError, "block_size must be a positive integer"),
        ({"batch": None}, ValueError, "batch is required"),
        ({"curvature": "fisher"}, ValueError, "curvature must be one of"),
        ({"model": "mlp"}, TypeError, "torch.nn.Module or a HessianOperator"),
    ],
)
def test_bad_input(oracle, kwargs, error, message):
    model, batch, _, _, _ = oracle("mlp")
    args = {"model": model, "batch": batch, "k": 3, "engine": "func", **kwargs}
    with pytest.raises(error, match=message):
        ik.top_eigvecs(args.pop("model"), args.pop("batch"), args.pop("k"), **args)


def _solve(solver, model, batch):
    if solver == "top_eigvecs":
        return ik.top_eigvecs(model, batch, 3)
    return ik.spectral_density(model, batch, n_probes=2, steps=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver", ["top_eigvecs", "spectral_density"])
def test_low_precision_model_is_refused_early(oracle, solver, dtype):
    """A float16 model reached the solver and failed on 'v has dtype torch.float32, the
    model's parameters are torch.float16'; now the message names what to change."""
    model, batch, _, _, _ = oracle("mlp")
    model = copy.deepcopy(model).to(dtype)
    batch = (batch[0].to(dtype), batch[1])
    message = f"the model's parameters are {dtype}; {solver} needs float32 or float64"
    with pytest.raises(TypeError, match=re.escape(message + " (model.float())")):
        _solve(solver, model, batch)
    operator = ik.HessianOperator(model, None, batch, engine="func")
    with pytest.raises(TypeError, match=re.escape(f"the operator's dtype is {dtype}; {solver}")):
        _solve(solver, operator, None)


@pytest.mark.parametrize("seed", ["a", 1.5, 1.7, None], ids=repr)
def test_seed_must_be_an_int(oracle, seed):
    """seed='a' or 1.5 raised torch's 'manual_seed expected a long'."""
    model, batch, _, _, _ = oracle("mlp")
    message = f"seed must be an int, got {re.escape(repr(seed))}"
    with pytest.raises(TypeError, match=message):
        ik.top_eigvecs(model, batch, 3, seed=seed, engine="func")
    with pytest.raises(TypeError, match=message):
        ik.spectral_density(model, batch, n_probes=2, steps=3, seed=seed, engine="func")


def test_density_helpers_check_their_arguments(oracle):
    """density(n_grid=0) was an IndexError, sigma=inf a NaN density, an unsorted grid a
    meaningless cdf, fraction_below(nan) 0.0 and fraction_below('a') numpy's TypeError."""
    model, batch, _, _, _ = oracle("mlp")
    dens = ik.spectral_density(model, batch, n_probes=2, steps=5, engine="func")
    with pytest.raises(ValueError, match="n_grid must be an integer >= 2, got 0"):
        dens.density(n_grid=0)
    with pytest.raises(ValueError, match="sigma must be positive and finite, got inf"):
        dens.density(sigma=float("inf"))
    with pytest.raises(ValueError, match="grid must be sorted ascending"):
        dens.density(grid=torch.tensor([1.0, -1.0, 0.0, 0.5]))
    with pytest.raises(ValueError, match="x must not hold NaN"):
        dens.fraction_below(float("nan"))
    with pytest.raises(TypeError, match="x must be a real number"):
        dens.fraction_below("a")
    grid, density, cdf = dens.density(grid=torch.tensor([-1.0, 0.0, 0.5, 1.0]))
    assert bool((cdf.diff() >= 0).all()) and torch.isfinite(density).all()


def test_same_seed_same_bits(oracle):
    model, batch, _, _, _ = oracle("cnn")
    first = ik.top_eigvecs(model, batch, 3, seed=5, engine="func")
    again = ik.top_eigvecs(model, batch, 3, seed=5, engine="func")
    other = ik.top_eigvecs(model, batch, 3, seed=6, engine="func")
    for name in ("eigenvalues", "eigenvectors", "residuals", "ritz_bounds", "converged"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert first.n_hvps == again.n_hvps and first.restarts == again.restarts
    assert not torch.equal(first.eigenvectors, other.eigenvectors)


def test_max_hvps_caps_the_solve(oracle):
    model, batch, _, _, _ = oracle("wide")
    res = ik.top_eigvecs(model, batch, 6, tol=1e-9, max_hvps=15, engine="func")
    assert res.n_hvps <= 15
    assert not res.all_converged
    assert torch.isfinite(res.eigenvalues).all() and torch.isfinite(res.residuals).all()


def test_progress_bars(oracle, capsys):
    model, batch, _, _, _ = oracle("mlp")
    ik.top_eigvecs(model, batch, 2, engine="func", progress=True)
    ik.spectral_density(model, batch, n_probes=2, steps=5, engine="func", progress=True)
    err = capsys.readouterr().err
    assert "top_eigvecs" in err and "SLQ" in err


# --------------------------------------------------------------------------------------
# spectral_density


def _hutchinson_std(matrix, dim, n_probes):
    off = matrix - torch.diag(matrix.diagonal())
    return math.sqrt(2.0) * float(torch.linalg.matrix_norm(off)) / dim / math.sqrt(n_probes)


@pytest.mark.parametrize("reorthogonalize", [False, True])
def test_slq_moments_match_the_traces(oracle, reorthogonalize):
    model, batch, hessian, values, _ = oracle("mlp")
    dim = hessian.shape[0]
    n_probes, steps = 16, 12
    dens = ik.spectral_density(
        model,
        batch,
        n_probes=n_probes,
        steps=steps,
        engine="func",
        reorthogonalize=reorthogonalize,
    )
    assert isinstance(dens, SpectralDensity)
    assert dens.n_hvps == n_probes * steps and dens.dim == dim
    assert dens.nodes.shape == dens.weights.shape == (n_probes, steps)
    torch.testing.assert_close(dens.weights.sum(1), torch.ones(n_probes, dtype=torch.float64))
    # Ritz values lie in the spectrum's hull (up to the float32 operator's rounding).
    h_norm = float(values.abs().max())
    assert dens.nodes.min() >= values.min() - 1e-5 * h_norm
    assert dens.nodes.max() <= values.max() + 1e-5 * h_norm
    assert dens.moment(0) == pytest.approx(1.0, abs=1e-12)
    power = torch.eye(dim, dtype=torch.float64)
    for order in range(1, 5):  # exact quadrature for degree < 2 * steps
        power = power @ hessian
        exact = float(power.trace()) / dim
        bound = 5 * _hutchinson_std(power, dim, n_probes) + 1e-5 * h_norm**order
        assert abs(dens.moment(order) - exact) <= bound, (order, dens.moment(order), exact)


def test_slq_density_and_cdf_match_the_exact_spectrum(oracle):
    model, batch, hessian, values, _ = oracle("cnn")
    dim = hessian.shape[0]
    dens = ik.spectral_density(model, batch, n_probes=16, steps=60, engine="func")
    span = float(values.max() - values.min())
    sigma = 0.05 * span
    grid = torch.linspace(float(values.min()) - 3 * sigma, float(values.max()) + 3 * sigma, 801)
    grid = grid.double()
    grid_out, density, cdf = dens.density(grid=grid, sigma=sigma)
    exact_nodes = values[None, :]
    exact_weights = torch.full_like(exact_nodes, 1.0 / dim)
    _, exact_density, exact_cdf = ik.linalg.density_on_grid(exact_nodes, exact_weights, grid, sigma)
    assert torch.equal(grid_out, grid)
    # Smoothed with 5 % of the range, 60 Lanczos steps resolve the spectrum; what is left is
    # the probes' variance. Measured: L1 distance 8.8e-3, sup |CDF difference| 2.6e-3.
    l1 = float(torch.trapezoid((density - exact_density).abs(), grid))
    assert l1 <= 0.03
    assert float((cdf - exact_cdf).abs().max()) <= 0.01
    assert torch.all(cdf[1:] >= cdf[:-1]) and float(cdf[-1]) == pytest.approx(1.0)
    # The smoothed cumulative fraction at the spectrum's quartiles (erf form, no grid).
    points = values[[dim // 4, dim // 2, 3 * dim // 4]]
    exact_fraction = ik.linalg.cumulative_count(exact_nodes, exact_weights, points, sigma=sigma)
    estimate = dens.fraction_below(points, sigma=sigma)
    assert (estimate - exact_fraction).abs().max() <= 0.01
    # Default grid and sigma work too.
    grid_default, density_default, cdf_default = dens.density()
    assert grid_default.shape == density_default.shape == cdf_default.shape == (1000,)


def test_slq_same_seed_same_bits_and_bad_input(oracle):
    model, batch, _, _, _ = oracle("mlp")
    first = ik.spectral_density(model, batch, n_probes=3, steps=8, engine="func", seed=2)
    again = ik.spectral_density(model, batch, n_probes=3, steps=8, engine="func", seed=2)
    assert torch.equal(first.nodes, again.nodes) and torch.equal(first.weights, again.weights)
    operator = ik.HessianOperator(model, None, batch, engine="func")
    from_operator = ik.spectral_density(operator, None, n_probes=3, steps=8, seed=2)
    assert torch.equal(from_operator.nodes, first.nodes)
    for kwargs, message in [
        ({"n_probes": 0}, "n_probes must be a positive integer"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"probes": "sobol"}, "probes must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            ik.spectral_density(model, batch, engine="func", **kwargs)
    with pytest.raises(ValueError, match="order must be"):
        first.moment(-1)
