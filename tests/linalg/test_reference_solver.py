"""The extension path of block Lanczos against its pure-PyTorch twin.

:func:`imc_kernels.reference.block_lanczos.block_lanczos` runs the solver with its kernel
families (``tsmm``, ``block_orth``) on their reference implementations; the extension path
runs the C++ ops. Both take the same decisions, so they must do the same number of products
and return the same pairs up to the rounding of the kernels.

Tolerances:

* eigenvalues: relative 1e-5, float32 rounding (u = 6e-8) with two orders of margin for
  its growth over the restarts of a solve. Measured: at most 3e-8.
* eigenvectors: the sine of the largest principal angle between the two sets, and for each
  isolated eigenvalue between the two vectors (up to sign), at most 1e-4. The two Krylov
  spaces drift apart by rounding at every step (amplified by 1 / relative gap); measured at
  most 2e-5 after 8 restarts. A double eigenvalue's vectors are compared only as a subspace,
  since any rotation inside it is as good.
"""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from imc_kernels import HessianOperator, _dispatch, _ext, ops
from imc_kernels.linalg import block_lanczos
from imc_kernels.reference import block_lanczos as twin_module

DIM = 2000
K = 10
VALUE_RTOL = 1e-5
VECTOR_SINE = 1e-4
# Wanted: 6, a double 5.5, then 5 ... 4.2, above a bulk in [-2, 4] (relative gaps >= 0.03).
TOP = [6.0, 5.5, 5.5, 5.0, 4.8, 4.6, 4.5, 4.4, 4.3, 4.2]

_UNAVAILABLE = _dispatch.cext_unsupported_reason(torch.device("cpu"), "block_orth_step")
needs_extension = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))


@pytest.fixture(scope="module")
def synthetic(make_spectrum_matrix):
    eigenvalues = torch.cat(
        [torch.tensor(TOP, dtype=torch.float64), torch.linspace(-2.0, 4.0, DIM - K)]
    )
    matrix, vectors = make_spectrum_matrix(eigenvalues, seed=6)
    return matrix.float(), vectors[:, :K]


@pytest.fixture(scope="module")
def mlp_operator():
    """A 20-32-10 tanh MLP with cross-entropy on 128 samples: 1002 weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(128, 20, generator=gen), torch.randint(0, 10, (128,), generator=gen))
    # The double-backward engine: plain autograd, no Triton (which the test suite runs in the
    # slow CPU interpreter), deterministic on CPU, so both paths see the same products.
    return HessianOperator(model, nn.CrossEntropyLoss(), batch, engine="double_backward")


def _compiled_op_calls(run) -> dict[str, int]:
    """``imc_kernels::*`` op calls (the C++ extension) made by ``run()``, by name (profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    calls: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("imc_kernels::"):
            calls[event.name] = calls.get(event.name, 0) + 1
    return calls


class _SelectSpy:
    """Records the backend :func:`imc_kernels._dispatch.select` picks for each op family.

    Cheaper than the profiler (which slows a single-vector solve tenfold), so every solve
    below runs under it.
    """

    def __init__(self, monkeypatch):
        self.picked: dict[str, set[str]] = {}
        select = _dispatch.select

        def spy(op, *args, **kwargs):
            backend = select(op, *args, **kwargs)
            self.picked.setdefault(op, set()).add(backend)
            return backend

        monkeypatch.setattr(_dispatch, "select", spy)

    def take(self) -> dict[str, set[str]]:
        picked, self.picked = self.picked, {}
        return picked


def _sine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces of ``a`` and ``b``."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    return float(torch.linalg.matrix_norm(qa - qb @ (qb.T @ qa), ord=2))


def _assert_same_solution(got, want, isolated: list[int]) -> None:
    assert got.n_matvecs == want.n_matvecs
    assert got.restarts == want.restarts
    assert got.all_converged and want.all_converged
    torch.testing.assert_close(got.eigenvalues, want.eigenvalues, rtol=VALUE_RTOL, atol=0)
    assert _sine(got.eigenvectors, want.eigenvectors) <= VECTOR_SINE
    for i in isolated:
        u, v = got.eigenvectors[:, i].double(), want.eigenvectors[:, i].double()
        assert min(float((u - v).norm()), float((u + v).norm())) <= VECTOR_SINE, i


@needs_extension
@pytest.mark.parametrize(
    "block_size, orthogonalization",
    [(4, "two_pass"), (5, "two_pass"), (3, "adaptive"), (None, "auto")],
)
def test_synthetic_operator(synthetic, block_size, orthogonalization, device, monkeypatch):
    if device.type == "cuda" and not _ext.load().cuda:
        pytest.skip("the C++ extension was built without CUDA kernels")
    matrix, true_vectors = synthetic
    matrix = matrix.to(device)
    kwargs = dict(block_size=block_size, orthogonalization=orthogonalization)
    spy = _SelectSpy(monkeypatch)
    results = {"extension": block_lanczos(matrix, DIM, K, **kwargs)}
    extension_picked = spy.take()
    results["twin"] = twin_module.block_lanczos(matrix, DIM, K, **kwargs)
    twin_picked = spy.take()
    assert set(twin_picked) <= set(twin_module.SOLVER_OPS)
    assert all(picked == {"reference"} for picked in twin_picked.values()), twin_picked
    if block_size is not None or device.type != "cpu":
        assert extension_picked["block_orth"] == {"cext"}
    else:  # single vectors on CPU: column-major basis, one lanczos_vector_step per step
        assert extension_picked["lanczos_vector"] == {"cext"}
    got, want = results["extension"], results["twin"]
    isolated = [i for i, value in enumerate(TOP) if TOP.count(value) == 1]
    _assert_same_solution(got, want, isolated)
    # Both are right, not only alike. Residuals r <= tol ||H|| = 6e-4 (tol = 1e-4): eigenvalue
    # errors r^2 / gap ~ 2e-6 (gap 0.2 to the bulk) plus float32 rounding of the products
    # (~6e-7); the wanted subspace within sqrt(k) r / gap ~ 1e-2 (Davis-Kahan).
    truth = torch.tensor(TOP, dtype=torch.float64)
    assert float((want.eigenvalues.cpu() - truth).abs().max()) < 1e-5
    assert _sine(want.eigenvectors.cpu(), true_vectors) < 1e-2


@needs_extension
def test_twin_calls_no_compiled_op(make_spectrum_matrix):
    eigenvalues = torch.cat([torch.tensor([9.0, 8.0, 7.0]), torch.linspace(-1, 5, 397)])
    matrix = make_spectrum_matrix(eigenvalues, seed=3)[0].float()
    extension = _compiled_op_calls(lambda: block_lanczos(matrix, 400, 3, block_size=4))
    assert extension.get("imc_kernels::block_orth_step", 0) > 0  # the profiler sees them
    assert _compiled_op_calls(lambda: twin_module.block_lanczos(matrix, 400, 3, block_size=4)) == {}


@needs_extension
@pytest.mark.parametrize("block_size", [1, 4])
def test_mlp_hessian(mlp_operator, block_size):
    got = block_lanczos(mlp_operator, mlp_operator.dim, K, block_size=block_size)
    want = twin_module.block_lanczos(mlp_operator, mlp_operator.dim, K, block_size=block_size)
    values = want.eigenvalues
    # Isolated: both neighbours farther than 1e-3 relative (no pair to rotate within).
    gaps = (values[:, None] - values[None, :]).abs() + torch.eye(K, dtype=values.dtype)
    isolated = [i for i in range(K) if float(gaps[i].min()) > 1e-3 * float(values.abs().max())]
    assert len(isolated) >= K // 2
    _assert_same_solution(got, want, isolated)


def test_twin_has_the_solver_signature():
    solver = inspect.signature(block_lanczos)
    twin = inspect.signature(twin_module.block_lanczos)
    assert list(twin.parameters) == list(solver.parameters)
    for name, parameter in solver.parameters.items():
        assert twin.parameters[name].default == parameter.default, name
        assert twin.parameters[name].kind == parameter.kind, name
    assert twin_module.block_lanczos.__doc__


def test_twin_runs_without_the_extension(monkeypatch, make_spectrum_matrix):
    # With the extension gone the twin is the only path; it must still solve (this is what
    # runs on a machine where the build failed), and agree with dense eigh.
    missing = _ext.ExtInfo(None, "none", False, "not built in this test")
    monkeypatch.setattr(_ext, "load", lambda: missing)
    eigenvalues = torch.cat([torch.tensor([9.0, 8.0, 7.0]), torch.linspace(-1, 5, 297)])
    matrix, vectors = make_spectrum_matrix(eigenvalues, seed=2)
    res = twin_module.block_lanczos(matrix, 300, 3, block_size=2, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, eigenvalues[:3].double(), rtol=1e-10, atol=0)
    assert _sine(res.eigenvectors, vectors[:, :3]) <= 1e-8


# ---- force_backend, the mechanism the twin rests on -----------------------------------------


def test_force_backend_is_scoped_to_the_named_families(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_BACKEND, raising=False)
    cpu = torch.device("cpu")
    tsmm = ("cext", "reference")
    default = _dispatch.select("tsmm", cpu, available=tsmm)
    with _dispatch.force_backend("reference", ops=twin_module.SOLVER_OPS):
        assert _dispatch.select("tsmm", cpu, available=tsmm) == "reference"
        assert _dispatch.select("block_orth", cpu, available=tsmm) == "reference"
        # Another family is untouched (the extension when it is loaded).
        assert _dispatch.select("another", cpu, available=tsmm) == default
        with _dispatch.force_backend("cext", ops="tsmm"):  # the innermost block wins
            if _ext.load().module is not None:
                assert _dispatch.select("tsmm", cpu, available=tsmm) == "cext"
        assert _dispatch.select("tsmm", cpu, available=tsmm) == "reference"
    assert _dispatch.select("tsmm", cpu, available=tsmm) == default


def test_force_backend_overrides_the_environment_and_explains_failures(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "cext")
    cpu = torch.device("cpu")
    with _dispatch.force_backend("reference"):
        assert _dispatch.select("tsmm", cpu, available=("cext", "reference")) == "reference"
    with _dispatch.force_backend("triton", ops=["masked_optim"]):
        with pytest.raises(_dispatch.BackendUnavailableError, match=r"force_backend\('triton'\)"):
            _dispatch.select("masked_optim", cpu, available=("reference",))
    with pytest.raises(ValueError, match="backend must be one of"):
        with _dispatch.force_backend("fortran"):
            pass


def test_force_backend_does_not_leak_into_other_threads():
    seen = []
    x = torch.randn(64, 3)
    with _dispatch.force_backend("reference", ops="tsmm"):
        ops.tsmm_xty(x, x)  # the forced path runs
        worker = threading.Thread(target=lambda: seen.append(_dispatch._forced_for("tsmm")))
        worker.start()
        worker.join()
        assert _dispatch._forced_for("tsmm")[0] == "reference"
    assert seen == [_dispatch._forced_for("tsmm")]  # the thread saw only the environment
