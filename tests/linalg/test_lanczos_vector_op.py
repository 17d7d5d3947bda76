"""``imc_kernels::lanczos_vector_step`` (csrc/lanczos/lanczos_vector_cpu.cpp) and its twin.

The op is one single-vector Lanczos step against a basis stored one vector per row: local
pass, full projection (a second one when the DGKS test asks), normalization into the next
row. Oracles: the pure-PyTorch twin :mod:`imc_kernels.reference.lanczos_vector`, the contract
``w = V^T c + beta q`` with ``q`` a unit vector orthogonal to ``V`` measured in float64, and
the solver's composed path (:func:`block_orthonormalize` after a local pass).

Tolerances: op and twin take the same fp64 dot products up to summation order and the same
working-dtype updates up to their order, so they agree to a few roundings of the largest
entry: allowed ``8 eps`` relative (observed at most ~2 eps in float32). The contract holds to
``O(u)``: allowed ``64 eps`` (observed at most ~4 eps).
"""

from __future__ import annotations

import pytest
import torch

from imc_kernels import _dispatch, ops
from imc_kernels.linalg import block_lanczos
from imc_kernels.linalg.orthogonalize import block_orthonormalize, default_rank_tol
from imc_kernels.reference import lanczos_vector as twin

DTYPES = [torch.float32, torch.float64]
N = 9001  # odd, more than two row chunks, not a multiple of any vector width
ROWS = 45
SENTINEL = 7.0


_UNAVAILABLE = _dispatch.cext_unsupported_reason(torch.device("cpu"), "lanczos_vector_step")
needs_op = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))


def _op(*args):
    return torch.ops.imc_kernels.lanczos_vector_step(*args)


IMPLEMENTATIONS = {"op": _op, "twin": twin.lanczos_vector_step}


def _problem(dtype, filled, *, seed=0, lanczos_like=True):
    """``rows`` with ``filled`` orthonormal rows, sentinel rows after them, and a product ``w``
    with large components along the last two basis vectors (as ``H v_j`` has)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.full((ROWS, N), SENTINEL, dtype=dtype)
    if filled:
        q, _ = torch.linalg.qr(torch.randn(N, filled, generator=g, dtype=torch.float64))
        rows[:filled] = q.T.to(dtype)
    w = torch.randn(N, generator=g, dtype=torch.float64)
    if filled and lanczos_like:
        w = w + 40.0 * q[:, -1] + 9.0 * q[:, max(filled - 2, 0)] + 1e-3 * q.sum(1)
    return rows, w.to(dtype)


def _run(impl, rows, filled, local, w, *, store=True, tau=None, auto=True):
    rows, w = rows.clone(), w.clone()
    out = torch.full_like(w, SENTINEL) if store else None
    tau = default_rank_tol(w.dtype) if tau is None else tau
    result = IMPLEMENTATIONS[impl](rows, filled, local, w, out, tau, auto)
    return rows, w, out, result


def _rel(a, b):
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


# ---- opcheck ----------------------------------------------------------------------------------


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    rows, w = _problem(dtype, 5)
    for store in (True, False):
        out = torch.empty_like(w) if store else None
        args = (rows.clone(), 5, 2, w.clone(), out, 1e-6, True)
        torch.library.opcheck(torch.ops.imc_kernels.lanczos_vector_step.default, args)


# ---- op against twin -------------------------------------------------------------------------


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filled, local", [(0, 0), (1, 1), (2, 2), (2, 0), (37, 2), (37, 1)])
@pytest.mark.parametrize("auto", [True, False], ids=["auto", "always"])
def test_op_matches_twin(dtype, filled, local, auto):
    rows, w = _problem(dtype, filled)
    eps = torch.finfo(dtype).eps
    got = _run("op", rows, filled, local, w, auto=auto)
    want = _run("twin", rows, filled, local, w, auto=auto)
    (rows_a, w_a, out_a, (c_a, b_a, f_a, n_a)) = got
    (rows_b, w_b, out_b, (c_b, b_b, f_b, n_b)) = want
    assert f_a.tolist() == f_b.tolist()
    assert f_a[0] == 0 and f_a[1] == 0
    assert f_a[4] == (0 if filled == 0 else (1 if auto else 2))
    if filled:
        assert _rel(c_a, c_b) <= 8 * eps
    assert abs(float(b_a - b_b)) <= 8 * eps * float(b_b)
    assert _rel(n_a, n_b) <= 8 * eps
    assert _rel(rows_a[filled], rows_b[filled]) <= 8 * eps
    assert _rel(w_a, w_b) <= 8 * eps * float(w.abs().max() / w_b.abs().max())
    assert torch.equal(out_a, w) and torch.equal(out_b, w)  # the product, bit for bit
    # Nothing but row `filled` written: the basis and the rows after the slot are untouched.
    for r in (rows_a, rows_b):
        assert torch.equal(r[:filled], rows[:filled])
        assert bool((r[filled + 1 :] == SENTINEL).all())


@needs_op
def test_op_without_product_out_and_same_bits_for_any_thread_count():
    rows, w = _problem(torch.float32, 37)
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            results.append(_run("op", rows, 37, 2, w, store=False))
    finally:
        torch.set_num_threads(threads)
    (rows_1, w_1, _, res_1), (rows_2, w_2, _, res_2) = results
    assert torch.equal(rows_1, rows_2) and torch.equal(w_1, w_2)
    for a, b in zip(res_1, res_2, strict=True):
        assert torch.equal(a, b)


# ---- the contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", [pytest.param("op", marks=needs_op), "twin"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filled, local", [(0, 0), (1, 1), (20, 2), (44, 2)])
def test_contract(impl, dtype, filled, local):
    """``w = V^T c + beta q``, ``||q|| = 1``, ``V q = 0``, ``reference = ||w||``, measured in
    float64."""
    rows, w = _problem(dtype, filled, seed=3)
    eps = torch.finfo(dtype).eps
    rows_out, _, _, (coeffs, coupling, flags, norms) = _run(impl, rows, filled, local, w)
    assert flags.tolist()[:4] == [0, 0, 0, 0]
    v = rows[:filled].double()
    q = rows_out[filled].double()
    w64 = w.double()
    residual = w64 - v.T @ coeffs - float(coupling) * q
    assert float(residual.norm() / w64.norm()) <= 64 * eps
    assert abs(float(q.norm()) - 1.0) <= 64 * eps
    if filled:
        assert float((v @ q).abs().max()) <= 64 * eps
    assert abs(float(norms[0]) / float(w64.norm()) - 1.0) <= 64 * eps
    assert 0 < float(norms[1]) <= 1.0


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_composed_solver_step(dtype):
    """The op equals :func:`block_orthonormalize` with ``b = 1`` after the local pass that
    :func:`imc_kernels.linalg.block_lanczos.expand_block` runs (two vectors), to rounding."""
    filled = 30
    rows, w = _problem(dtype, filled, seed=5)
    eps = torch.finfo(dtype).eps
    rows_op, _, _, (coeffs, coupling, _, _) = _run("op", rows, filled, 2, w)
    basis = rows[:filled].T  # (n, filled), column-major like the solver's
    product = w.clone().view(-1, 1)
    local = torch.zeros(filled, 1, dtype=torch.float64)
    for i in (filled - 2, filled - 1):
        piece = basis[:, i : i + 1].contiguous()
        c = piece.double().T @ product.double()
        product -= piece * c.to(dtype)
        local[i] += c[0]
    prior = local.square().sum(0)
    c_ref, q_ref, b_ref, _, info = block_orthonormalize(
        basis, product, prior_norms_sq=prior, second_projection="auto"
    )
    assert not bool(info.deficient)
    assert _rel(coeffs, (c_ref + local)[:, 0]) <= 16 * eps
    assert abs(float(coupling) - float(b_ref)) <= 16 * eps * float(b_ref)
    assert _rel(rows_op[filled], q_ref[:, 0]) <= 16 * eps


# ---- rank loss, second projection, non-finite input ------------------------------------------


@pytest.mark.parametrize("impl", [pytest.param("op", marks=needs_op), "twin"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_product_in_the_span_is_deficient(impl, dtype):
    """``w`` in the span of ``V``: the deficient flag, the raw residual ``W1`` in the slot,
    ``C1 + l`` as coefficients and no coupling, for the caller's repair."""
    filled = 12
    rows, _ = _problem(dtype, filled)
    coeffs_true = torch.linspace(-3.0, 5.0, filled, dtype=torch.float64)
    w = (rows[:filled].double().T @ coeffs_true).to(dtype)
    rows_out, w_out, _, (coeffs, coupling, flags, norms) = _run(impl, rows, filled, 2, w)
    eps = torch.finfo(dtype).eps
    assert flags[0] == 1 and flags[1] == 0
    assert float(coupling) == 0.0
    assert torch.equal(rows_out[filled], w_out)  # W1, the raw residual
    assert float(w_out.double().norm()) <= 64 * eps * float(w.double().norm())
    assert _rel(coeffs, coeffs_true) <= 64 * eps
    assert float(norms[1]) <= default_rank_tol(dtype)


@pytest.mark.parametrize("impl", [pytest.param("op", marks=needs_op), "twin"])
def test_dgks_asks_for_a_second_projection(impl):
    """No local pass and a product almost inside the basis: the first projection cancels
    most of it, the DGKS test asks for a second one (projections 2), and the result is
    orthogonal to the basis although one projection would leave ~1e-5 of ``V`` in it."""
    dtype, filled = torch.float32, 20
    rows, _ = _problem(dtype, filled)
    g = torch.Generator().manual_seed(9)
    inside = rows[:filled].double().T @ torch.randn(filled, generator=g, dtype=torch.float64)
    w = (inside + 1e-3 * torch.randn(N, generator=g, dtype=torch.float64)).to(dtype)
    rows_out, _, _, (_, _, flags, _) = _run(impl, rows, filled, 0, w, auto=True)
    assert flags.tolist() == [0, 0, 0, 0, 2]
    q = rows_out[filled].double()
    assert float((rows[:filled].double() @ q).abs().max()) <= 64 * torch.finfo(dtype).eps


@pytest.mark.parametrize("impl", [pytest.param("op", marks=needs_op), "twin"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_product_sets_the_flag(impl, bad):
    rows, w = _problem(torch.float32, 10)
    w[N // 2] = bad
    _, _, _, (_, _, flags, _) = _run(impl, rows, 10, 2, w)
    assert flags[1] == 1


# ---- bad input -------------------------------------------------------------------------------


def _good(dtype=torch.float32):
    rows, w = _problem(dtype, 4)
    return rows, w


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("w_2d", ValueError, "1-D vector w"),
        ("w_strided", ValueError, "contiguous 1-D"),
        ("rows_length", ValueError, "contiguous rows"),
        ("rows_column_major", ValueError, "contiguous rows"),
        ("filled_last_row", ValueError, "receives the next vector"),
        ("local_above_filled", ValueError, "local = 5"),
        ("tau", ValueError, "tau"),
        ("dtype", TypeError, "float32 or float64"),
        ("mixed_dtype", TypeError, "dtype"),
        ("w_is_a_row", ValueError, "share memory"),
        ("product_out_shape", ValueError, "product_out"),
    ],
)
def test_bad_input_raises_a_clear_error(case, error, match):
    rows, w = _good()
    args = dict(rows=rows, filled=4, local=2, w=w, tau=1e-6, product_out=None)
    if case == "w_2d":
        args["w"] = w.view(-1, 1)
    elif case == "w_strided":
        args["w"] = torch.randn(2 * N)[::2]
    elif case == "rows_length":
        args["rows"] = rows[:, :-1]
    elif case == "rows_column_major":
        args["rows"] = torch.randn(N, ROWS).T  # (ROWS, N) with unit row stride
    elif case == "filled_last_row":
        args["filled"] = ROWS
    elif case == "local_above_filled":
        args["local"] = 5
    elif case == "tau":
        args["tau"] = float("nan")
    elif case == "dtype":
        args["rows"], args["w"] = rows.half(), w.half()
    elif case == "mixed_dtype":
        args["rows"] = rows.double()
    elif case == "w_is_a_row":
        args["w"] = rows[10]
    elif case == "product_out_shape":
        args["product_out"] = torch.empty(N + 1)
    with pytest.raises(error, match=match):
        ops.lanczos_vector_step(
            args["rows"],
            args["filled"],
            args["local"],
            args["w"],
            tau=args["tau"],
            product_out=args["product_out"],
        )


@needs_op
@pytest.mark.parametrize(
    "case, match",
    [
        ("filled", "row `filled` receives"),
        ("local", "must be between 0 and filled"),
        ("overlap", "share memory"),
        ("rows_column_major", "contiguous rows"),
    ],
)
def test_the_raw_op_checks_its_inputs(case, match):
    """Direct ``torch.ops`` calls get the op's own checks (RuntimeError naming the problem)."""
    rows, w = _good()
    args = [rows, 4, 2, w, None, 1e-6, True]
    if case == "filled":
        args[1] = ROWS
    elif case == "local":
        args[2] = 5
    elif case == "overlap":
        args[3] = rows[20]
    elif case == "rows_column_major":
        args[0] = torch.randn(N, ROWS).T
    with pytest.raises(RuntimeError, match=match):
        _op(*args)


# ---- the solver ------------------------------------------------------------------------------


def _diagonal_problem(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.linspace(30.0, 10.0, 12), torch.rand(n - 12, generator=g) * 5])
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    matrix = (q * values.double()) @ q.T
    return matrix.float(), values.sort(descending=True).values[:8].double()


@needs_op
def test_solver_with_the_op_matches_the_twin_path():
    """Single-vector block Lanczos on the CPU runs its steps through the op; forcing the
    twin gives the same eigenpairs to rounding, and both match the known spectrum."""
    matrix, top = _diagonal_problem()
    solve = lambda: block_lanczos(matrix, matrix.shape[0], 8, block_size=1, tol=1e-6)  # noqa: E731
    with_op = solve()
    with _dispatch.force_backend("reference", ops=["lanczos_vector"]):
        with_twin = solve()
    assert with_op.all_converged and with_twin.all_converged
    assert with_op.n_matvecs == with_twin.n_matvecs
    torch.testing.assert_close(with_op.eigenvalues, top, rtol=1e-5, atol=0)
    torch.testing.assert_close(with_twin.eigenvalues, with_op.eigenvalues, rtol=1e-6, atol=0)
    overlap = (with_op.eigenvectors.double().T @ with_twin.eigenvectors.double()).abs()
    assert float((overlap.diagonal() - 1).abs().max()) <= 1e-4
