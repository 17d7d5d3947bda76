"""Fused activation kernels: Triton launchers against the twin, the twin against torch.func.

On CPU the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set by conftest).

Tolerances. Kernel and twin evaluate the same formulas in the same precision, but through
different transcendental implementations (numpy or libdevice against ATen) and a different
grouping of a few products, so they agree to a few ulp of the largest term of each output:
fp32 ``rtol=1e-5, atol=1e-6`` (eps = 1.2e-7, so about 8 ulp; the atol covers outputs that are
sums of cancelling terms, ``act' rg + act'' u g``), fp64 ``rtol=1e-12, atol=1e-14`` (eps =
2.2e-16; the Taylor branch of tanh is accurate to ~25 ulp at its threshold).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imc_kernels import _dispatch, ops
from imc_kernels.reference import activation as ref

pytest.importorskip("triton")
from imc_kernels.ops import activation as triton_activation  # noqa: E402

KINDS = ref.ACTIVATIONS
SLOPE = 0.2  # not exact in fp32: exercises the hi/lo split of the slope in fp64 runs
# (8, 64): one aligned block; (3, 37) and (2, 3, 5, 7): awkward, conv-like for the latter.
SHAPES = [(8, 64), (3, 37), (2, 3, 5, 7)]
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
}
# Values where the branches of the kernels meet or the textbook formulas cancel: the kink of
# ReLU, both sides of the tanh series thresholds (0.3 for fp32, 0.08 for fp64), tiny and
# large magnitudes.
SPECIAL_Z = [0.0, -0.0, 1e-6, -1e-4, 0.079, 0.081, 0.299, -0.301, 2.5, -9.0, 20.0, -20.0, 40.0]


def _pre_activation(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
    flat = z.view(-1)
    special = torch.tensor(SPECIAL_Z, dtype=torch.float64)[: flat.numel()]
    flat[: special.numel()] = special
    return z.to(dtype)


def _randn(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, equal_nan=False, **TOLERANCES[dtype])


# --- Triton launchers against the twin ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_jvp_matches_reference(kind, shape, b, dtype):
    z = _pre_activation(shape, dtype)
    tangents = _randn((b, *shape), dtype, seed=1)
    for write_primal in (True, False):
        out_primal = _poisoned(shape, dtype) if write_primal else None
        out_tangents = _poisoned((b, *shape), dtype)
        a, ra = triton_activation.activation_jvp(
            z,
            tangents,
            kind,
            negative_slope=SLOPE,
            write_primal=write_primal,
            out_primal=out_primal,
            out_tangents=out_tangents,
        )
        a_ref, ra_ref = ref.activation_jvp(
            z, tangents, kind, negative_slope=SLOPE, write_primal=write_primal
        )
        assert ra is out_tangents
        _assert_close(ra, ra_ref, dtype)
        if write_primal:
            assert a is out_primal
            _assert_close(a, a_ref, dtype)
        else:
            assert a is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_hvp_backward_matches_reference(kind, shape, b, dtype):
    z = _pre_activation(shape, dtype)
    tangents = _randn((b, *shape), dtype, seed=1)
    grad = _randn(shape, dtype, seed=2)
    grad_tangents = _randn((b, *shape), dtype, seed=3)
    for curvature, write_primal in [("hessian", True), ("hessian", False), ("ggn", True)]:
        out_primal = _poisoned(shape, dtype) if write_primal else None
        out_tangents = _poisoned((b, *shape), dtype)
        g_z, rg_z = triton_activation.activation_hvp_backward(
            z,
            # The GGN never reads the forward tangents: None must do.
            tangents if curvature == "hessian" else None,
            grad,
            grad_tangents,
            kind,
            negative_slope=SLOPE,
            curvature=curvature,
            write_primal=write_primal,
            out_primal=out_primal,
            out_tangents=out_tangents,
        )
        g_ref, rg_ref = ref.activation_hvp_backward(
            z,
            tangents,
            grad,
            grad_tangents,
            kind,
            negative_slope=SLOPE,
            curvature=curvature,
            write_primal=write_primal,
        )
        assert rg_z is out_tangents
        _assert_close(rg_z, rg_ref, dtype)
        if write_primal:
            assert g_z is out_primal
            _assert_close(g_z, g_ref, dtype)
        else:
            assert g_z is None


@pytest.mark.parametrize("kind", KINDS)
def test_several_programs_and_a_partial_block(kind):
    # 5 * 413 = 2065 elements: three programs of 1024, the last one nearly empty.
    shape, b, dtype = (5, 413), 3, torch.float32
    z = _pre_activation(shape, dtype)
    tangents, grad = _randn((b, *shape), dtype, 1), _randn(shape, dtype, 2)
    grad_tangents = _randn((b, *shape), dtype, 3)
    a, ra = triton_activation.activation_jvp(
        z,
        tangents,
        kind,
        out_primal=_poisoned(shape, dtype),
        out_tangents=_poisoned(tangents.shape, dtype),
    )
    a_ref, ra_ref = ref.activation_jvp(z, tangents, kind)
    _assert_close(a, a_ref, dtype)
    _assert_close(ra, ra_ref, dtype)
    g_z, rg_z = triton_activation.activation_hvp_backward(
        z,
        tangents,
        grad,
        grad_tangents,
        kind,
        write_primal=True,
        out_primal=_poisoned(shape, dtype),
        out_tangents=_poisoned(tangents.shape, dtype),
    )
    g_ref, rg_ref = ref.activation_hvp_backward(
        z, tangents, grad, grad_tangents, kind, write_primal=True
    )
    _assert_close(g_z, g_ref, dtype)
    _assert_close(rg_z, rg_ref, dtype)


def test_non_contiguous_inputs():
    z = _pre_activation((37, 6), torch.float32).t()
    tangents = _randn((6, 37, 2), torch.float32, 1).permute(2, 0, 1)
    a, ra = triton_activation.activation_jvp(z, tangents, "gelu")
    a_ref, ra_ref = ref.activation_jvp(z, tangents, "gelu")
    _assert_close(a, a_ref, torch.float32)
    _assert_close(ra, ra_ref, torch.float32)


def test_empty_inputs():
    z = torch.empty(0, 5)
    a, ra = triton_activation.activation_jvp(z, torch.empty(2, 0, 5), "silu")
    assert a.shape == (0, 5) and ra.shape == (2, 0, 5)
    g, rg = triton_activation.activation_hvp_backward(
        z, None, z, torch.empty(0, 0, 5), "silu", curvature="ggn", write_primal=True
    )
    assert g.shape == (0, 5) and rg.shape == (0, 0, 5)


def test_nan_propagates():
    z = torch.tensor([float("nan"), 1.0, -1.0])
    tangents = torch.ones(1, 3)
    for kind in KINDS:
        a, _ = triton_activation.activation_jvp(z, tangents, kind)
        a_ref, _ = ref.activation_jvp(z, tangents, kind)
        assert torch.isnan(a[0]) and torch.isnan(a_ref[0]), kind
        _assert_close(a[1:], a_ref[1:], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_relative_accuracy_near_zero(dtype):
    # 2 sigmoid(2z) - 1 cancels near 0; the Taylor branch must keep tanh accurate to a few ulp
    # *relative*, which the atol of the other tests would not notice.
    z = torch.logspace(-8, 0.7, 301, dtype=torch.float64)
    z = torch.cat([z, -z]).to(dtype)
    a, _ = triton_activation.activation_jvp(z, torch.empty(0, *z.shape, dtype=dtype), "tanh")
    expected = torch.tanh(z.double())
    rel = ((a.double() - expected) / expected).abs().max().item()
    # fp32: 8 ulp (eps 1.2e-7); fp64: the exp branch at the 0.08 threshold, ~30 ulp.
    assert rel < (1e-6 if dtype == torch.float32 else 1e-14), rel


@pytest.mark.parametrize("kind", ["tanh", "sigmoid", "gelu_tanh", "silu"])
def test_derivatives_accurate_in_the_tails(kind):
    # act' and act'' in fp32 at |z| up to 30 against the fp64 twin, relatively: 1 - s and
    # 1 - t^2 are formed without cancellation, so the relative error stays near eps (1.2e-7)
    # times the condition of the formula. 2e-5 is loose for that and far below the O(1) error
    # of the textbook forms there.
    z64 = torch.cat([torch.linspace(-30.0, -4.0, 53), torch.linspace(4.0, 30.0, 53)])
    z64 = z64.double()
    z = z64.float()
    ones = torch.ones(1, *z.shape)
    _, d1 = triton_activation.activation_jvp(z, ones, kind)
    _, d2 = triton_activation.activation_hvp_backward(
        z, ones, torch.ones_like(z), torch.zeros_like(ones), kind
    )
    d1_ref, d2_ref = ref.derivatives(z.double(), kind)
    keep = d1_ref.abs() > 1e-30  # fp32 underflow leaves nothing to compare
    torch.testing.assert_close(d1[0].double()[keep], d1_ref[keep], rtol=2e-5, atol=0.0)
    keep = d2_ref.abs() > 1e-30
    torch.testing.assert_close(d2[0].double()[keep], d2_ref[keep], rtol=2e-5, atol=0.0)


@pytest.mark.parametrize("kind", ["gelu", "tanh", "leaky_relu"])
def test_block_equals_single_tangents(kind):
    # Each tangent is processed alone inside the kernel: the block result must be bit-equal.
    shape, dtype = (3, 37), torch.float32
    z, grad = _pre_activation(shape, dtype), _randn(shape, dtype, 2)
    tangents, grad_tangents = _randn((3, *shape), dtype, 1), _randn((3, *shape), dtype, 3)
    _, block = triton_activation.activation_hvp_backward(z, tangents, grad, grad_tangents, kind)
    for i in range(3):
        _, single = triton_activation.activation_hvp_backward(
            z, tangents[i : i + 1], grad, grad_tangents[i : i + 1], kind
        )
        assert torch.equal(block[i], single[0])


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic(kind):
    shape, dtype = (2, 3, 5, 7), torch.float32
    z, grad = _pre_activation(shape, dtype), _randn(shape, dtype, 2)
    tangents, grad_tangents = _randn((3, *shape), dtype, 1), _randn((3, *shape), dtype, 3)
    runs = [
        triton_activation.activation_jvp(z, tangents, kind)
        + triton_activation.activation_hvp_backward(
            z, tangents, grad, grad_tangents, kind, write_primal=True
        )
        for _ in range(2)
    ]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# --- The twin against independent oracles (torch.func, torch.nn.functional), fp64 ---------

ORACLES = {
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, SLOPE),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def _oracle_z():
    z = _pre_activation((211,), torch.float64)
    # torch.func differentiates ReLU at exactly 0 as the twin does (0), but the second
    # derivative of LeakyReLU there is a convention; keep the kink out of the oracle test.
    return torch.where(z == 0, torch.full_like(z, 0.5), z)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_derivatives_match_torch_func(kind):
    f = ORACLES[kind]
    z = _oracle_z()
    d1_oracle = torch.func.vmap(torch.func.grad(f))(z)
    d2_oracle = torch.func.vmap(torch.func.grad(torch.func.grad(f)))(z)
    d1, d2 = ref.derivatives(z, kind, negative_slope=SLOPE)
    if d2 is None:
        d2 = torch.zeros_like(z)
    # fp64 against ATen's own formulas: agreement to ~1e-15 relative; GELU's erf form and
    # the tanh form's sech^2 differ in evaluation order, hence 1e-12.
    torch.testing.assert_close(ref.primal(z, kind, SLOPE), f(z), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d1, d1_oracle, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d2, d2_oracle, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_hvp_matches_jvp_of_vjp(kind):
    # The backward R-op is the directional derivative of (z, g) -> act'(z) g along (u, rg):
    # torch.func.jvp of torch.func.vjp, an oracle independent of the derivative table.
    f = ORACLES[kind]
    z = _oracle_z().view(1, 211)
    tangents, grad = _randn((3, 1, 211), torch.float64, 1), _randn((1, 211), torch.float64, 2)
    grad_tangents = _randn((3, 1, 211), torch.float64, 3)

    def backward(z_, g_):
        return torch.func.vjp(f, z_)[1](g_)[0]

    a, ra = ref.activation_jvp(z, tangents, kind, negative_slope=SLOPE)
    g_z, rg_z = ref.activation_hvp_backward(
        z, tangents, grad, grad_tangents, kind, negative_slope=SLOPE, write_primal=True
    )
    torch.testing.assert_close(g_z, backward(z, grad), rtol=1e-12, atol=1e-14)
    for i in range(3):
        a_oracle, ra_oracle = torch.func.jvp(f, (z,), (tangents[i],))
        torch.testing.assert_close(a, a_oracle, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ra[i], ra_oracle, rtol=1e-12, atol=1e-14)
        _, rg_oracle = torch.func.jvp(backward, (z, grad), (tangents[i], grad_tangents[i]))
        torch.testing.assert_close(rg_z[i], rg_oracle, rtol=1e-12, atol=1e-14)
        _, ggn = ref.activation_hvp_backward(
            z, None, grad, grad_tangents[i : i + 1], kind, negative_slope=SLOPE, curvature="ggn"
        )
        torch.testing.assert_close(ggn[0], backward(z, grad_tangents[i]), rtol=1e-12, atol=1e-14)


# --- Through the dispatcher ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["relu", "gelu_tanh", "silu"])
def test_dispatcher_backends_agree(kind, monkeypatch):
    shape, dtype = (3, 37), torch.float32
    z, grad = _pre_activation(shape, dtype), _randn(shape, dtype, 2)
    tangents, grad_tangents = _randn((3, *shape), dtype, 1), _randn((3, *shape), dtype, 3)
    calls = []
    for name in ("activation_jvp", "activation_hvp_backward"):
        launcher = getattr(triton_activation, name)

        def spy(*args, _launcher=launcher, **kwargs):
            calls.append(_launcher.__name__)
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(triton_activation, name, spy)
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv(_dispatch.ENV_BACKEND, backend)
        results[backend] = ops.activation_jvp(z, tangents, kind) + ops.activation_hvp_backward(
            z, tangents, grad, grad_tangents, kind, write_primal=True
        )
    assert calls == ["activation_jvp", "activation_hvp_backward"]
    for tri, reference in zip(results["triton"], results["reference"]):
        _assert_close(tri, reference, dtype)


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    with pytest.raises(_dispatch.BackendUnavailableError, match="TRITON_INTERPRET"):
        _dispatch.select("activation", cpu, torch.float32, available=("triton", "reference"))
    z = torch.randn(4)
    with pytest.raises(_dispatch.BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.activation_jvp(z, z[None], "relu")


def test_forced_triton_bfloat16_in_interpreter_raises(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    z = torch.randn(4, dtype=torch.bfloat16)
    with pytest.raises(_dispatch.BackendUnavailableError, match="bfloat16"):
        ops.activation_jvp(z, z[None], "relu")


# --- Bad input ----------------------------------------------------------------------------


def test_bad_input_jvp():
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ops.activation_jvp(z, z[None], "swish")
    with pytest.raises(ValueError, match="tangents must have shape"):
        ops.activation_jvp(z, torch.randn(2, 4, 3), "relu")
    with pytest.raises(ValueError, match="tangents must have shape"):
        ops.activation_jvp(z, z, "relu")  # the block dimension is missing
    with pytest.raises(TypeError, match="must match z"):
        ops.activation_jvp(z, z[None].double(), "relu")
    with pytest.raises(TypeError, match="floating point"):
        ops.activation_jvp(
            torch.ones(3, dtype=torch.int64), torch.ones(1, 3, dtype=torch.int64), "relu"
        )


def test_bad_input_backward():
    z = torch.randn(3, 4)
    t = z[None]
    with pytest.raises(ValueError, match="unknown curvature 'fisher'"):
        ops.activation_hvp_backward(z, t, z, t, "tanh", curvature="fisher")
    with pytest.raises(ValueError, match="needs the forward tangents"):
        ops.activation_hvp_backward(z, None, z, t, "tanh")
    with pytest.raises(ValueError, match="grad must have the shape of z"):
        ops.activation_hvp_backward(z, t, z.t(), t, "tanh")
    with pytest.raises(TypeError, match="grad .* must match z"):
        ops.activation_hvp_backward(z, t, z.double(), t, "tanh")
    with pytest.raises(ValueError, match="must have one shape"):
        ops.activation_hvp_backward(z, torch.randn(2, 3, 4), z, t, "tanh")
    with pytest.raises(TypeError, match="tangents .* must match z"):
        ops.activation_hvp_backward(z, t.double(), z, t, "tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        ops.activation_hvp_backward(z, t, z, t, "softplus")


def test_bad_output_buffers():
    z = torch.randn(3, 4)
    t = z[None]
    with pytest.raises(ValueError, match="out_tangents must have shape"):
        triton_activation.activation_jvp(z, t, "relu", out_tangents=torch.empty(2, 3, 4))
    with pytest.raises(TypeError, match="out_primal"):
        triton_activation.activation_jvp(z, t, "relu", out_primal=torch.empty(3, 4).double())
    with pytest.raises(ValueError, match="contiguous"):
        triton_activation.activation_jvp(z, t, "relu", out_primal=torch.empty(4, 3).t())
    with pytest.raises(ValueError, match="write_primal=False"):
        triton_activation.activation_hvp_backward(
            z, t, z, t, "relu", write_primal=False, out_primal=torch.empty(3, 4)
        )


# --- GPU only -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_fp32_matches_reference(kind):
    shape, dtype, cuda = (257, 131), torch.float32, torch.device("cuda")
    z = _pre_activation(shape, dtype).to(cuda)
    tangents, grad = _randn((3, *shape), dtype, 1).to(cuda), _randn(shape, dtype, 2).to(cuda)
    grad_tangents = _randn((3, *shape), dtype, 3).to(cuda)
    got = triton_activation.activation_jvp(z, tangents, kind) + (
        triton_activation.activation_hvp_backward(
            z, tangents, grad, grad_tangents, kind, write_primal=True
        )
    )
    want = ref.activation_jvp(z, tangents, kind) + ref.activation_hvp_backward(
        z, tangents, grad, grad_tangents, kind, write_primal=True
    )
    for g, w in zip(got, want):
        _assert_close(g, w, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_low_precision_rule(kind, dtype):
    # STYLE.md: the kernel's error against an fp64 reference is at most twice the error of the
    # reference itself run in the low dtype (plus one ulp of slack for exact ties).
    shape, cuda = (64, 129), torch.device("cuda")
    z = _pre_activation(shape, dtype).to(cuda)
    tangents, grad = _randn((3, *shape), dtype, 1).to(cuda), _randn(shape, dtype, 2).to(cuda)
    grad_tangents = _randn((3, *shape), dtype, 3).to(cuda)
    args = (z, tangents, grad, grad_tangents)
    args64 = tuple(x.double() for x in args)

    def run(module, z_, t_, g_, gt_):
        return module.activation_jvp(z_, t_, kind) + module.activation_hvp_backward(
            z_, t_, g_, gt_, kind, write_primal=True
        )

    exact = run(ref, *args64)
    ulp = torch.finfo(dtype).eps
    for kernel_out, low_out, fp64_out in zip(run(triton_activation, *args), run(ref, *args), exact):
        assert kernel_out.dtype == dtype
        kernel_err = (kernel_out.double() - fp64_out).abs().max().item()
        ref_err = (low_out.double() - fp64_out).abs().max().item()
        assert kernel_err <= 2 * ref_err + ulp * fp64_out.abs().max().item(), (kernel_err, ref_err)
