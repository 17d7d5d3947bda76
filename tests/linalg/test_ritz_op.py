"""``imc_kernels::ritz_vectors`` (csrc/lanczos/ritz_cpu.cpp) and its twin.

The op forms the Ritz vectors ``X = V S`` of a finished solve and, from the stored products
``P = H V``, the squared residual norms ``||P s_i - theta_i x_i||^2`` in one pass. Oracles: the
same quantities in float64 from the float64 inputs (``S`` and ``theta`` rounded to the working
dtype first, as the op does), and the pure-PyTorch twin :mod:`imc_kernels.reference.ritz`.

Tolerances: ``x`` is a sum of ``m`` products in the working dtype: allowed ``4 m eps`` relative
to ``max |V| sum |S|`` (observed below ``m eps / 4``); the squares are fp64 sums of rounded
residuals: allowed ``8 m eps`` relative to the largest residual entry times its norm (observed
below ``m eps``).
"""

from __future__ import annotations

import pytest
import torch

from imc_kernels import _dispatch, ops
from imc_kernels.reference import ritz as twin

DTYPES = [torch.float32, torch.float64]
N = 9001  # odd, more than two row chunks, not a multiple of any vector width


_UNAVAILABLE = _dispatch.cext_unsupported_reason(torch.device("cpu"), "ritz_vectors")
needs_op = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` (n, m) as a column-major view (one vector per memory row, the single-vector
    solver's basis), a row-major view of a wider buffer (the block solver's basis), or a
    row-major contiguous tensor."""
    n, m = t.shape
    if kind == "column":
        store = torch.full((m + 3, n), float("nan"), dtype=t.dtype)
        store[:m] = t.T
        return store.T[:, :m]
    if kind == "wide":
        store = torch.full((n, m + 5), float("nan"), dtype=t.dtype)
        store[:, :m] = t
        return store[:, :m]
    return t.contiguous()


def _problem(dtype, m, k, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(N, m, generator=g, dtype=torch.float64)
    products = torch.randn(N, m, generator=g, dtype=torch.float64)
    s = torch.randn(m, k, generator=g, dtype=torch.float64)
    theta = torch.randn(k, generator=g, dtype=torch.float64) * 5
    return basis.to(dtype), products.to(dtype), s, theta


def _exact(basis, products, s, theta):
    """float64 X and squares from the working-dtype inputs, S and theta rounded as the op
    rounds them."""
    dtype = basis.dtype
    s_w = s.to(dtype).double()
    theta_w = theta.to(dtype).double()
    x = basis.double() @ s_w
    if products is None:
        return x, None
    residual = products.double() @ s_w - x * theta_w
    return x, residual.square().sum(0)


def _check(dtype, basis, products, s, theta, x, squares):
    eps = torch.finfo(dtype).eps
    m = s.shape[0]
    want_x, want_sq = _exact(basis, products, s, theta)
    assert x.shape == want_x.shape and x.dtype == dtype and x.is_contiguous()
    scale = float(basis.abs().max()) * float(s.abs().sum(0).max())
    assert float((x.double() - want_x).abs().max()) <= 4 * m * eps * scale
    if products is None:
        assert squares.numel() == 0 and squares.dtype == torch.float64
        return
    assert squares.dtype == torch.float64 and squares.shape == want_sq.shape
    # Per column: a residual entry is off by ~m eps (|P||s| + |theta||x|), its square by twice
    # that times the entry, summed over N rows.
    bound = 8 * m * eps * (scale + float(theta.abs().max()) * scale) * want_sq.sqrt() * N**0.5
    assert bool(((squares - want_sq).abs() <= bound + 1e-300).all())


IMPLEMENTATIONS = {
    "op": lambda *a: torch.ops.imc_kernels.ritz_vectors(*a),
    "twin": twin.ritz_vectors,
}


@pytest.mark.parametrize("impl", [pytest.param("op", marks=needs_op), "twin"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["column", "wide", "contiguous"])
@pytest.mark.parametrize("m, k", [(1, 1), (21, 10), (21, 1), (13, 5), (30, 13), (40, 25)])
def test_against_float64(impl, dtype, kind, m, k):
    basis, products, s, theta = _problem(dtype, m, k)
    v = _layout(basis, kind)
    p = _layout(products, "column" if kind == "column" else kind)
    x, squares = IMPLEMENTATIONS[impl](v, p, s, theta)
    _check(dtype, basis, products, s, theta, x, squares)
    x2, none = IMPLEMENTATIONS[impl](v, None, s, theta)
    _check(dtype, basis, None, s, theta, x2, none)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_matches_twin_and_mixed_layouts(dtype):
    basis, products, s, theta = _problem(dtype, 21, 10, seed=3)
    # A column-major basis with row-major products takes the general kernel.
    got = ops.ritz_vectors(_layout(basis, "column"), _layout(products, "wide"), s, theta)
    want = twin.ritz_vectors(basis, products, s, theta)
    eps = torch.finfo(dtype).eps
    assert float((got[0] - want[0]).abs().max()) <= 64 * eps * float(want[0].abs().max())
    assert float(((got[1] - want[1]) / want[1]).abs().max()) <= 1e3 * eps


@needs_op
def test_same_bits_for_any_thread_count():
    basis, products, s, theta = _problem(torch.float32, 21, 10)
    v, p = _layout(basis, "column"), _layout(products, "column")
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            results.append(ops.ritz_vectors(v, p, s, theta))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    basis, products, s, theta = _problem(dtype, 6, 3)
    n = 40
    for p in (products[:n], None):
        args = (basis[:n], p, s, theta)
        torch.library.opcheck(torch.ops.imc_kernels.ritz_vectors.default, args)


def _f64(*shape):
    return torch.ones(*shape, dtype=torch.float64)


@needs_op
def test_empty_sizes():
    x, sq = ops.ritz_vectors(torch.ones(7, 4), torch.ones(7, 4), _f64(4, 0), _f64(0))
    assert x.shape == (7, 0) and sq.shape == (0,)
    x, sq = ops.ritz_vectors(torch.ones(0, 4), torch.ones(0, 4), _f64(4, 2), _f64(2))
    assert x.shape == (0, 2) and sq.tolist() == [0.0, 0.0]


ONES = torch.ones
INT = torch.int32
BAD = {
    "basis 1-D": ((ONES(5), None, _f64(5, 1), _f64(1)), ValueError, "2-D basis"),
    "integer basis": (
        (ONES(5, 2, dtype=INT), None, _f64(2, 1), _f64(1)),
        TypeError,
        "float32 or float64",
    ),
    "s rows": ((ONES(5, 2), None, _f64(3, 1), _f64(1)), ValueError, r"s of shape \(2, k\)"),
    "s float32": ((ONES(5, 2), None, ONES(2, 1), _f64(1)), TypeError, "float64 s and theta"),
    "theta length": (
        (ONES(5, 2), None, _f64(2, 3), _f64(2)),
        ValueError,
        r"theta of shape \(3,\)",
    ),
    "products shape": (
        (ONES(5, 2), ONES(5, 3), _f64(2, 1), _f64(1)),
        ValueError,
        "products like the basis",
    ),
    "products dtype": (
        (ONES(5, 2), _f64(5, 2), _f64(2, 1), _f64(1)),
        ValueError,
        "products like the basis",
    ),
}
RAW = ["basis 1-D", "s rows", "s float32", "theta length", "products shape"]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_a_clear_error(case):
    args, error, match = BAD[case]
    with pytest.raises(error, match=match):
        ops.ritz_vectors(*args)


@needs_op
@pytest.mark.parametrize("case", RAW)
def test_the_raw_op_checks_its_inputs(case):
    args, _, _ = BAD[case]
    with pytest.raises(RuntimeError, match="imc_kernels::ritz_vectors"):
        torch.ops.imc_kernels.ritz_vectors(*args)
