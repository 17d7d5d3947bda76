"""``imc_kernels::block_orth_step`` (csrc/lanczos/block_orth_{cpu.cpp,cuda.cu}) and its twin.

The op is one block Lanczos orthogonalization step: BCGS2 with a Cholesky QR inside each pass,
``W = V C + Q B``. Oracles: its pure-PyTorch twin :mod:`imc_kernels.reference.block_orth`, and
the contract itself, measured in float64.

Tolerances:

* op against twin (well-conditioned blocks): both take the same fp64 projections and Grams up
  to summation order, and the same working-dtype GEMMs. In float32 the fp64 differences are
  far below one float32 rounding, which the small factors can flip: observed at most one ulp
  of a tensor's largest entry, allowed ``4 eps``. In float64 the summation order of ``n``
  products shows (random-walk growth): observed at most ``0.43 sqrt(n) eps``, allowed
  ``2 sqrt(n) eps``. Both relative to the largest entry of the twin's output.
* the contract, ``||W - V C - Q B||_F / ||W||_F``, ``||Q^T Q - I||_F`` and ``||V^T Q||_F`` in
  units of the working dtype's eps: CholQR2 with fp64 Grams makes ``Q`` orthonormal to
  ``O(b u)`` up to ``kappa ~ 1e8`` (Fukaya et al. 2014; Yamamoto et al. 2015) and BCGS2
  orthogonal to ``V`` to ``O(u)`` (Barlow and Smoktunowicz 2013). Observed at most 29 eps
  for ``b <= 17`` and ``kappa`` up to 1e6, allowed 64 eps.
* the rank check's ``tau = 100 eps`` (``default_rank_tol``): in a float32 block of condition
  1e6 a column may keep only ~1e-6 of its norm outside the others' span, below
  ``tau = 1.2e-5``, which is *deficient* there by design; the contract test gives such blocks
  ``tau = 1e-9`` to test the factorization itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from imc_kernels import _dispatch, _ext, ops
from imc_kernels.linalg.orthogonalize import default_rank_tol
from imc_kernels.reference import block_orth as twin

EPS64 = torch.finfo(torch.float64).eps
DTYPES = [torch.float32, torch.float64]
N = 1001  # odd, not a multiple of any tile, chunk or block size
FILLED = 40
# Buffer columns before the basis and after the q slot, so the op must honour the row stride
# and must not write outside the slot.
LEAD, TAIL = 3, 2
CONTRACT_EPS = 64  # see the module docstring
NAN = float("nan")


def _extension_loaded() -> bool:
    return _ext.load().module is not None


needs_extension = pytest.mark.skipif(
    not _extension_loaded(), reason=f"C++ extension not loaded: {_ext.load().reason}"
)


def _op_unavailable(device: torch.device) -> str | None:
    """Why the compiled op cannot run on ``device``; None when it can."""
    return _dispatch.cext_unsupported_reason(torch.device(device), "block_orth_step")


def _require_op(device: torch.device) -> None:
    reason = _op_unavailable(device)
    if reason is not None:
        pytest.skip(reason)


def _op(*args):
    return torch.ops.imc_kernels.block_orth_step(*args)


IMPLEMENTATIONS = {"op": _op, "twin": twin.block_orth_step}


def _implementations(device) -> dict:
    """Both where the op runs on ``device``; else the twin alone (then the CPU path)."""
    if _op_unavailable(device) is None:
        return IMPLEMENTATIONS
    return {"twin": twin.block_orth_step}


@dataclass
class StepInputs:
    """A basis inside a wider row-major buffer (followed by the q slot) and a block ``W``."""

    buffer: torch.Tensor  # (n, LEAD + filled + b + TAIL)
    block: torch.Tensor  # (n, b)
    filled: int
    prior_norms_sq: torch.Tensor | None = None

    @property
    def basis(self) -> torch.Tensor:
        return self.buffer[:, LEAD : LEAD + self.filled]


def _orthonormal(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    return q * torch.sign(r.diagonal())


def _make_inputs(
    n, filled, b, dtype, device, *, seed=0, cond=1.0, in_span=0.0, prior=False
) -> StepInputs:
    """``W = V G in_span + U diag(s) Z^T`` with ``U`` orthogonal to ``V``, ``s`` from 1 to 1/cond.

    ``cond = 1`` gives a plain Gaussian block (plus the in-span part).
    """
    gen = torch.Generator().manual_seed(seed)
    buffer = torch.zeros(n, LEAD + filled + b + TAIL, dtype=torch.float64)
    buffer[:, :LEAD] = torch.randn(n, LEAD, generator=gen, dtype=torch.float64)
    buffer[:, -TAIL:] = torch.randn(n, TAIL, generator=gen, dtype=torch.float64)
    basis = _orthonormal(n, filled, gen)
    buffer[:, LEAD : LEAD + filled] = basis
    if cond == 1.0:
        block = torch.randn(n, b, generator=gen, dtype=torch.float64)
    else:
        u = torch.randn(n, b, generator=gen, dtype=torch.float64)
        u -= basis @ (basis.T @ u)
        u, _ = torch.linalg.qr(u)
        z = _orthonormal(b, b, gen)
        s = torch.logspace(0.0, -math.log10(cond), b, dtype=torch.float64)
        block = (u * s) @ z.T * math.sqrt(n)
    if filled and in_span:
        block += in_span * basis @ torch.randn(filled, b, generator=gen, dtype=torch.float64)
    prior_norms_sq = torch.rand(b, generator=gen, dtype=torch.float64) * n if prior else None
    return StepInputs(
        buffer.to(dtype).to(device),
        block.to(dtype).to(device),
        filled,
        None if prior_norms_sq is None else prior_norms_sq.to(device),
    )


def _run(fn, inputs: StepInputs, *, tau=None, auto=False, wide_basis=False) -> dict:
    """``fn`` (op or twin) on fresh copies, q in its slot of the buffer, outputs NaN-poisoned.

    With ``wide_basis`` the op gets every buffer column from the basis on (``filled`` fewer
    than its width, the q slot among them), as the Lanczos driver passes its buffer.
    """
    buffer = inputs.buffer.clone()
    block = inputs.block.clone()
    n, b = block.shape
    filled = inputs.filled
    device, dtype = block.device, block.dtype
    basis = buffer[:, LEAD:] if wide_basis else buffer[:, LEAD : LEAD + filled]
    q = buffer[:, LEAD + filled : LEAD + filled + b]
    q.fill_(NAN)
    work = torch.full_like(block, NAN)
    small = dict(dtype=torch.float64, device=device)
    coeffs = torch.full((filled, b), NAN, **small)
    coeffs_first = torch.full((filled, b), NAN, **small)
    coupling = torch.full((b, b), NAN, **small)
    tau = default_rank_tol(dtype) if tau is None else tau
    prior = None if inputs.prior_norms_sq is None else inputs.prior_norms_sq.clone()
    flags, norms = fn(
        basis, filled, block, work, q, coeffs, coeffs_first, coupling, prior, tau, auto
    )
    return {
        "block": block,
        "work": work,
        "q": q,
        "coeffs": coeffs,
        "coeffs_first": coeffs_first,
        "coupling": coupling,
        "flags": flags,
        "norms": norms,
        "buffer": buffer,
    }


def _contract(inputs: StepInputs, out: dict) -> dict[str, float]:
    """The step's contract in float64, in units of the working dtype's eps."""
    eps = torch.finfo(inputs.block.dtype).eps
    w = inputs.block.double()
    v = inputs.basis.double()
    q = out["q"].double()
    b = w.shape[1]
    rebuilt = v @ out["coeffs"] + q @ out["coupling"]
    eye = torch.eye(b, dtype=torch.float64, device=w.device)
    return {
        "reconstruction": float(torch.linalg.matrix_norm(w - rebuilt) / w.norm()) / eps,
        "orthonormality": float(torch.linalg.matrix_norm(q.T @ q - eye)) / eps,
        "against_basis": float(torch.linalg.matrix_norm(v.T @ q)) / eps if v.numel() else 0.0,
    }


def _assert_outside_slot_untouched(inputs: StepInputs, out: dict) -> None:
    b = inputs.block.shape[1]
    slot = slice(LEAD + inputs.filled, LEAD + inputs.filled + b)
    before, after = inputs.buffer, out["buffer"]
    assert torch.equal(after[:, : slot.start], before[:, : slot.start])
    assert torch.equal(after[:, slot.stop :], before[:, slot.stop :])


# ---- opcheck -----------------------------------------------------------------------------


def _opcheck_samples(device):
    samples = []
    for n, filled, b, dtype, prior, auto in [
        (37, 5, 3, torch.float32, False, False),
        (37, 0, 1, torch.float64, True, False),
        (41, 7, 4, torch.float32, True, True),
        (9, 2, 8, torch.float64, False, True),  # b close to n
    ]:
        inputs = _make_inputs(n, filled, b, dtype, device, seed=n + b, prior=prior)
        buffer = inputs.buffer.clone()
        small = dict(dtype=torch.float64, device=device)
        samples.append(
            (
                buffer[:, LEAD : LEAD + filled],  # a column slice: row stride > width
                filled,
                inputs.block.clone(),
                torch.empty(n, b, dtype=dtype, device=device),
                buffer[:, LEAD + filled : LEAD + filled + b],
                torch.empty(filled, b, **small),
                torch.empty(filled, b, **small),
                torch.empty(b, b, **small),
                inputs.prior_norms_sq,
                default_rank_tol(dtype),
                auto,
            )
        )
    return samples


def test_opcheck(device):
    _require_op(device)
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.imc_kernels.block_orth_step.default, args)


# ---- the op against its twin ---------------------------------------------------------------


def _twin_tolerance(dtype: torch.dtype, n: int) -> float:
    """Relative (to the largest entry) op-twin difference allowed; see the module docstring."""
    return 4 * torch.finfo(dtype).eps + 2 * math.sqrt(n) * EPS64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", [1, 3, 8, 17])
# FILLED - 3: a basis width that is not a multiple of the CPU update's vector lanes (8 fp32,
# 4 fp64), so its scalar tail runs.
@pytest.mark.parametrize("filled", [0, FILLED, FILLED - 3])
@pytest.mark.parametrize("auto", [False, True], ids=["always", "auto"])
def test_op_matches_twin(dtype, b, filled, auto, device):
    _require_op(device)
    # Odd b: with a prior, and the basis handed over as the wide buffer view.
    variant = b % 2 == 1
    inputs = _make_inputs(N, filled, b, dtype, device, seed=b, prior=variant, in_span=0.5)
    got = _run(_op, inputs, auto=auto, wide_basis=variant)
    want = _run(twin.block_orth_step, inputs, auto=auto, wide_basis=variant)
    assert got["flags"].tolist() == want["flags"].tolist()
    assert got["flags"].dtype == torch.int32 and got["norms"].dtype == torch.float64
    assert want["flags"][twin.FLAG_DEFICIENT] == 0
    tol = _twin_tolerance(dtype, N)
    for name in ("block", "work", "q", "coeffs", "coeffs_first", "coupling", "norms"):
        expected = want[name]
        assert got[name].shape == expected.shape and got[name].dtype == expected.dtype, name
        if expected.numel() == 0:
            continue
        scale = float(expected.abs().max())
        # Not NaN-tolerant: an element the op left unwritten keeps its poison and fails here.
        torch.testing.assert_close(got[name], expected, rtol=0, atol=tol * scale, msg=name)
    _assert_outside_slot_untouched(inputs, got)
    _assert_outside_slot_untouched(inputs, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_matches_twin_over_many_rows(dtype, device):
    # Past the CPU kernel's 4096-row chunks and the CUDA kernel's 1024-row partials.
    _require_op(device)
    n = 100_003
    inputs = _make_inputs(n, 33, 5, dtype, device, seed=7, in_span=2.0)
    got = _run(_op, inputs)
    want = _run(twin.block_orth_step, inputs)
    assert got["flags"].tolist() == want["flags"].tolist()
    tol = _twin_tolerance(dtype, n)
    for name in ("block", "q", "coeffs", "coupling", "norms"):
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=tol * scale, msg=name)


def test_op_same_bits_twice(device):
    _require_op(device)
    inputs = _make_inputs(N, FILLED, 8, torch.float32, device, seed=3, in_span=1.0)
    first, second = _run(_op, inputs), _run(_op, inputs)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


# ---- the contract --------------------------------------------------------------------------

CONTRACT_CASES = [
    # (b, filled, cond, in_span): Gaussian blocks, and blocks of condition 1e6 with a large
    # part in the basis's span (the first projection cancels most of each column).
    *[(b, filled, 1.0, 0.5) for b in (1, 3, 8, 17) for filled in (0, FILLED)],
    *[(b, filled, 1e6, 10.0) for b in (3, 17) for filled in (0, FILLED)],
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, filled, cond, in_span", CONTRACT_CASES)
def test_contract(implementation, dtype, b, filled, cond, in_span, device):
    if implementation == "op":
        _require_op(device)
    seed = 11 * b + filled
    inputs = _make_inputs(N, filled, b, dtype, device, seed=seed, cond=cond, in_span=in_span)
    # The default fp32 tau would (rightly) call the cond-1e6 block deficient: module docstring.
    tau = 1e-9 if cond > 1 and dtype == torch.float32 else None
    for auto in (False, True):
        out = _run(IMPLEMENTATIONS[implementation], inputs, tau=tau, auto=auto)
        assert out["flags"][twin.FLAG_DEFICIENT] == 0
        assert out["flags"][twin.FLAG_NON_FINITE] == 0
        errors = _contract(inputs, out)
        assert all(value <= CONTRACT_EPS for value in errors.values()), (auto, errors)
        assert torch.equal(out["coupling"], out["coupling"].triu())  # B = R2 R1
        assert bool((out["coupling"].diagonal() > 0).all())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rank_tolerance_follows_the_working_dtype(implementation, device):
    # A column whose part outside the others' span is 1e-6 of its norm: lost for float32
    # (tau = 1.2e-5, and float32 data holds that part to only ~6% anyway), kept for float64
    # (tau = 2.2e-14). The check is relative to each column's norm, so scaling cannot hide it.
    if implementation == "op":
        _require_op(device)
    fn = IMPLEMENTATIONS[implementation]
    gen = torch.Generator().manual_seed(5)
    for dtype, deficient in ((torch.float32, 1), (torch.float64, 0)):
        inputs = _make_inputs(N, FILLED, 8, torch.float64, device, seed=5)
        block, basis = inputs.block, inputs.basis
        new = torch.randn(N, generator=gen, dtype=torch.float64).to(device)
        new -= basis @ (basis.T @ new) + block @ torch.linalg.lstsq(block, new).solution
        block[:, 7] = block[:, 0] + 1e-6 * block[:, 0].norm() * new / new.norm()
        inputs = StepInputs(inputs.buffer.to(dtype), block.to(dtype), FILLED)
        out = _run(fn, inputs)
        assert out["flags"][twin.FLAG_DEFICIENT] == deficient, dtype
        # The ratio that decided it: R1_ii / reference_i of the last column.
        assert 1e-7 < float(out["norms"][1, 7]) < 1e-5, dtype


# ---- rank deficiency ------------------------------------------------------------------------


def _deficient_inputs(case: str, dtype, device) -> StepInputs:
    b = 5
    filled = 0 if case == "zero_column" else FILLED
    inputs = _make_inputs(N, filled, b, dtype, device, seed=17)
    block = inputs.block.double()
    if case == "in_span":
        # Column 2 lies in span(V) up to the working dtype's rounding.
        gen = torch.Generator().manual_seed(4)
        mix = torch.randn(filled, generator=gen, dtype=torch.float64).to(device)
        block[:, 2] = inputs.basis.double() @ mix
    elif case == "combination":
        block[:, 3] = block[:, 0] - 0.5 * block[:, 4]
    elif case == "duplicate":
        block[:, 4] = block[:, 1]
    elif case == "zero_column":
        block[:, 1] = 0.0
    inputs.block = block.to(dtype)
    return inputs


# R1_ii / reference below which a Cholesky of an fp64 Gram sees only rounding: the pivot of an
# exactly singular Gram is +-(a few eps64) * ||w||^2, so R_ii is 0 or ~sqrt(b eps64) ~ 3e-8.
GRAM_RESOLUTION = 1e-7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["in_span", "combination", "duplicate", "zero_column"])
def test_rank_deficient_block_sets_the_flag(case, dtype, device):
    inputs = _deficient_inputs(case, dtype, device)
    results = {name: _run(fn, inputs) for name, fn in _implementations(device).items()}
    # Known limit, float64 data only: a column dependent on the *block's* other columns is
    # judged from the Gram's Cholesky, which cannot resolve below GRAM_RESOLUTION, far above
    # tau = 2.2e-14. Its rounded pivot decides: <= 0 flags the step, > 0 passes it with
    # R_ii ~ 1e-8 * reference and a rounding-noise direction in Q that still meets the
    # contract (a valid orthonormal extension, like the driver's random replacement). The op
    # and the twin round that pivot differently, so they may disagree there. (A column in
    # span(V) is judged after the projection, where nothing cancels: always flagged.)
    limited = dtype == torch.float64 and case in ("combination", "duplicate")
    for name, out in results.items():
        flags = out["flags"].tolist()
        assert flags[twin.FLAG_NON_FINITE] == 0, (name, flags)
        _assert_outside_slot_untouched(inputs, out)
        if limited and flags[twin.FLAG_DEFICIENT] == 0:
            assert float(out["norms"][1].min()) <= GRAM_RESOLUTION, name
            # CholQR2 at kappa ~ 1e8 ~ 1/sqrt(eps64), its limit: Q^T Q - I grows to ~150 eps
            # (measured); 1000 eps still tells a working step from a broken one.
            errors = _contract(inputs, out)
            assert all(value <= 1000 for value in errors.values()), (name, errors)
            continue
        assert flags[twin.FLAG_DEFICIENT] == 1, (name, flags)
        # The raw residual for the repair: q = W1, C = C1, B = 0, and W = V C1 + W1.
        assert torch.equal(out["q"], out["block"]), name
        assert torch.equal(out["coeffs"], out["coeffs_first"]), name
        assert torch.equal(out["coupling"], torch.zeros_like(out["coupling"])), name
        w, v = inputs.block.double(), inputs.basis.double()
        residual = w - v @ out["coeffs"] - out["q"].double()
        eps = torch.finfo(dtype).eps
        assert float(residual.norm() / w.norm()) <= CONTRACT_EPS * eps, name
    if "op" not in results:
        return
    op_flags, twin_flags = results["op"]["flags"], results["twin"]["flags"]
    assert op_flags[twin.FLAG_PROJECTIONS] == twin_flags[twin.FLAG_PROJECTIONS]
    if not limited:
        assert op_flags[twin.FLAG_DEFICIENT] == twin_flags[twin.FLAG_DEFICIENT] == 1
    if case == "zero_column":
        # An exactly zero pivot fails both Cholesky factorizations at column 2 (1-based).
        assert op_flags[twin.FLAG_INFO_FIRST] == twin_flags[twin.FLAG_INFO_FIRST] == 2


# ---- non-finite blocks --------------------------------------------------------------------


@pytest.mark.parametrize("value", [NAN, float("inf"), -float("inf")])
@pytest.mark.parametrize("filled", [0, FILLED])
@pytest.mark.parametrize("row, column", [(0, 0), (N // 2, 2), (N - 1, 4)])
def test_non_finite_block_sets_the_flag(value, filled, row, column, device):
    inputs = _make_inputs(N, filled, 5, torch.float32, device, seed=23)
    inputs.block[row, column] = value
    for name, fn in _implementations(device).items():
        flags = _run(fn, inputs)["flags"].tolist()
        assert flags[twin.FLAG_NON_FINITE] == 1, (name, flags)
        assert flags[twin.FLAG_DEFICIENT] == 1, (name, flags)  # a NaN pivot fails the check


def test_finite_block_with_huge_entries_is_not_non_finite(device):
    # 1e30 squared overflows float32 but not the fp64 accumulation of the norms.
    inputs = _make_inputs(N, FILLED, 3, torch.float32, device, seed=29)
    inputs.block[5, 1] = 1e30
    for name, fn in _implementations(device).items():
        assert _run(fn, inputs)["flags"][twin.FLAG_NON_FINITE] == 0, name


# ---- auto_second_projection (DGKS) --------------------------------------------------------


def _kept_fraction_inputs(kept: float, device) -> StepInputs:
    """A single column ``w = V g + u`` (``u`` orthogonal to ``V``), ``||u|| / ||w|| = kept``."""
    gen = torch.Generator().manual_seed(31)
    inputs = _make_inputs(N, FILLED, 1, torch.float32, device, seed=31)
    basis = inputs.basis.double().cpu()
    u = torch.randn(N, 1, generator=gen, dtype=torch.float64)
    u -= basis @ (basis.T @ u)
    inside = basis @ torch.randn(FILLED, 1, generator=gen, dtype=torch.float64)
    inside *= u.norm() * math.sqrt(1 / kept**2 - 1) / inside.norm()
    inputs.block = (inside + u).float().to(device)
    return inputs


@pytest.mark.parametrize(
    "kept, projections",
    # DGKS: skip the second projection when every column kept more than 1/sqrt(2) of its norm.
    [(0.9, 1), (0.75, 1), (0.65, 2), (0.1, 2), (1e-3, 2)],
)
def test_auto_second_projection_follows_the_dgks_threshold(kept, projections, device):
    inputs = _kept_fraction_inputs(kept, device)
    for name, fn in _implementations(device).items():
        out = _run(fn, inputs, auto=True)
        assert out["flags"][twin.FLAG_PROJECTIONS] == projections, name
        if projections == 1:
            assert torch.equal(out["coeffs"], out["coeffs_first"]), name  # no C2 R1 term
        # Skipped or not, the result is as orthogonal to V as with both passes.
        errors = _contract(inputs, out)
        assert all(value <= CONTRACT_EPS for value in errors.values()), (name, errors)
        always = _run(fn, inputs, auto=False)
        assert always["flags"][twin.FLAG_PROJECTIONS] == 2, name


@pytest.mark.parametrize("case", ["gaussian", "in_span", "dependent_columns", "empty_basis"])
def test_auto_second_projection_skips_only_when_safe(case, device):
    b = 6
    if case == "gaussian":  # n >> filled: each column keeps ~all its norm; skip
        inputs, expected = _make_inputs(N, FILLED, b, torch.float32, device, seed=37), 1
    elif case == "in_span":  # mostly in span(V): heavy cancellation; project again
        inputs = _make_inputs(N, FILLED, b, torch.float32, device, seed=37, in_span=30.0)
        expected = 2
    elif case == "dependent_columns":  # orthogonal to V, but nearly dependent among themselves
        inputs = _make_inputs(N, FILLED, b, torch.float32, device, seed=37, cond=1e3)
        expected = 2
    else:
        inputs, expected = _make_inputs(N, 0, b, torch.float32, device, seed=37), 0
    for name, fn in _implementations(device).items():
        out = _run(fn, inputs, auto=True)
        assert out["flags"][twin.FLAG_PROJECTIONS] == expected, name
        assert out["flags"][twin.FLAG_DEFICIENT] == 0, name
        errors = _contract(inputs, out)
        assert all(value <= CONTRACT_EPS for value in errors.values()), (name, errors)


# ---- bad inputs ------------------------------------------------------------------------------


def _good_args(n=12, filled=3, b=2, dtype=torch.float32):
    f64 = torch.float64
    return {
        "basis": torch.linalg.qr(torch.randn(n, filled, dtype=f64))[0].to(dtype).contiguous(),
        "filled": filled,
        "block": torch.randn(n, b, dtype=dtype),
        "work": torch.empty(n, b, dtype=dtype),
        "q": torch.empty(n, b, dtype=dtype),
        "coeffs": torch.empty(filled, b, dtype=f64),
        "coeffs_first": torch.empty(filled, b, dtype=f64),
        "coupling": torch.empty(b, b, dtype=f64),
        "prior_norms_sq": None,
        "tau": 1e-5,
    }


def _bad(**changes):
    def build():
        args = _good_args()
        for key, value in changes.items():
            args[key] = value(args) if callable(value) else value
        return args

    return build


BAD_INPUTS = [
    # (id, builder, exception from imc_kernels.ops, a word in both messages)
    ("coeffs_float32", _bad(coeffs=lambda a: a["coeffs"].float()), TypeError, "float64"),
    ("coupling_float32", _bad(coupling=lambda a: a["coupling"].float()), TypeError, "float64"),
    ("basis_float64", _bad(basis=lambda a: a["basis"].double()), TypeError, "dtype"),
    ("block_int", _bad(block=lambda a: a["block"].int()), TypeError, "float32 or float64"),
    ("b_over_512", lambda: _good_args(n=600, b=513), ValueError, "512"),
    ("basis_rows", _bad(basis=lambda a: torch.zeros(13, 3)), ValueError, "rows"),
    ("work_shape", _bad(work=torch.empty(12, 3)), ValueError, "shaped like the block"),
    ("q_shape", _bad(q=torch.empty(11, 2)), ValueError, "shaped like the block"),
    ("coeffs_shape", _bad(coeffs=torch.empty(2, 2, dtype=torch.float64)), ValueError, "coeffs"),
    ("filled_too_large", _bad(filled=4), ValueError, "filled"),
    ("negative_tau", _bad(tau=-1.0), ValueError, "tau"),
    ("nan_tau", _bad(tau=NAN), ValueError, "tau"),
    ("prior_shape", _bad(prior_norms_sq=torch.ones(3, dtype=torch.float64)), ValueError, "prior"),
    ("block_transposed", _bad(block=lambda a: torch.randn(2, 12).T), ValueError, "contiguous"),
    ("work_is_block", _bad(work=lambda a: a["block"]), ValueError, "share memory"),
    ("q_is_work", _bad(q=lambda a: a["work"]), ValueError, "share memory"),
]


@pytest.mark.parametrize(
    "build, error, word", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_raises_through_ops(build, error, word):
    args = build()
    tau = args.pop("tau")
    with pytest.raises(error, match=word):
        ops.block_orth_step(**args, tau=tau)


@needs_extension
@pytest.mark.parametrize(
    "build, word", [(case[1], case[3]) for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_raises_through_raw_op(build, word):
    args = build()
    with pytest.raises(RuntimeError, match=word):
        _op(*args.values(), False)


# ---- memory ----------------------------------------------------------------------------------


def _allocated_bytes_cpu(inputs: StepInputs) -> int:
    """Bytes the op takes from the CPU allocator in one call (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    n, b = inputs.block.shape
    filled = inputs.filled
    args = (
        inputs.basis,
        filled,
        inputs.block.clone(),
        torch.empty(n, b, dtype=inputs.block.dtype),
        torch.empty(n, b, dtype=inputs.block.dtype),
        torch.empty(filled, b, dtype=torch.float64),
        torch.empty(filled, b, dtype=torch.float64),
        torch.empty(b, b, dtype=torch.float64),
        None,
        1e-5,
        False,
    )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _op(*args)
    return sum(max(event.self_cpu_memory_usage, 0) for event in prof.events())


@needs_extension
def test_cpu_op_allocates_nothing_that_grows_with_rows():
    # "Without allocation on the hot path": the op may take the b x b factors, the (filled, b)
    # coefficients rounded for the GEMM and its two small outputs, but nothing of n rows.
    small = _make_inputs(N, FILLED, 8, torch.float32, "cpu", seed=41)
    large = _make_inputs(20 * N, FILLED, 8, torch.float32, "cpu", seed=41)
    allocated = _allocated_bytes_cpu(small)
    assert allocated == _allocated_bytes_cpu(large)
    assert 0 < allocated < N * 8 * 4  # profiled at all, and less than one block of N rows


@pytest.mark.gpu
def test_cuda_op_allocates_no_block_sized_temporaries():
    _require_op(torch.device("cuda"))
    n, b = 1 << 20, 8
    inputs = _make_inputs(n, FILLED, b, torch.float32, "cuda", seed=43)
    _run(_op, inputs)  # warm-up: the cuBLAS workspace is allocated on the first GEMM
    buffer = inputs.buffer.clone()
    args = (
        buffer[:, LEAD : LEAD + FILLED],
        FILLED,
        inputs.block.clone(),
        torch.empty(n, b, device="cuda"),
        buffer[:, LEAD + FILLED : LEAD + FILLED + b],
        torch.empty(FILLED, b, dtype=torch.float64, device="cuda"),
        torch.empty(FILLED, b, dtype=torch.float64, device="cuda"),
        torch.empty(b, b, dtype=torch.float64, device="cuda"),
        None,
        1e-5,
        False,
    )
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _op(*args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # The tsmm partials (n / 1024 chunks of FILLED x b doubles, 2.6 MB here) are allowed;
    # an (n, b) float32 temporary (32 MiB) is not.
    assert extra < n * b * 4 // 4, extra
