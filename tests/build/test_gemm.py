"""``imc_kernels::gemm_out`` (csrc/gemm/) and :func:`imc_kernels.ops.gemm`.

``out = a @ b + beta * out``; on the CPU float32 runs through the oneDNN matmul inside
libtorch. Oracle: the same expression in float64 on the exact inputs. Tolerance: the standard
GEMM bound ``|fl(AB + beta C) - (AB + beta C)| <= gamma_(k+2) (|A||B| + |beta C|)`` elementwise,
``gamma_j = j u / (1 - j u)`` with ``u`` the unit roundoff of the operands' dtype, whatever
order the library sums in.
"""

from __future__ import annotations

import pytest
import torch

from imc_kernels import _ext, ops
from imc_kernels.reference import gemm as ref

needs_extension = pytest.mark.skipif(
    _ext.load().module is None, reason=f"C++ extension not loaded: {_ext.load().reason}"
)
needs_onednn = pytest.mark.skipif(
    _ext.load().module is None or not torch.backends.mkldnn.is_available(),
    reason="needs the C++ extension and a torch built with oneDNN (MKLDNN)",
)


def _operands(m, k, n, dtype, *, transpose_a=False, transpose_b=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, m, generator=gen).T if transpose_a else torch.randn(m, k, generator=gen)
    b = torch.randn(n, k, generator=gen).T if transpose_b else torch.randn(k, n, generator=gen)
    c = torch.randn(m, n, generator=gen)
    return a.to(dtype), b.to(dtype), c.to(dtype)


def _assert_within_gemm_bound(out, a, b, c, beta):
    unit = torch.finfo(out.dtype).eps / 2
    j = a.shape[1] + 2
    gamma = j * unit / (1 - j * unit)
    a64, b64, c64 = a.double(), b.double(), c.double()
    exact = a64 @ b64 + beta * c64
    bound = gamma * (a64.abs() @ b64.abs() + abs(beta) * c64.abs())
    excess = (out.double() - exact).abs() - bound
    assert torch.isfinite(out).all()
    assert excess.max().item() <= 0.0, excess.max().item()


# (m, k, n): the fused engine's MLP shapes at batch 1024 and awkward small ones.
SHAPES = [(1, 1, 1), (7, 13, 5), (1024, 784, 300), (300, 1024, 784), (1024, 100, 10), (33, 1, 65)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5])
@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_within_the_gemm_bound(shape, beta, layout, dtype):
    a, b, c = _operands(*shape, dtype, transpose_a=layout[0] == "t", transpose_b=layout[1] == "t")
    out = c.clone()
    returned = ops.gemm(a, b, out=out, beta=beta)
    assert returned is out
    _assert_within_gemm_bound(out, a, b, c, beta)


def test_non_contiguous_operands_and_output():
    a, b, c = _operands(40, 30, 20, torch.float32)
    a_strided = torch.randn(40, 60)[:, ::2].copy_(a)
    out = torch.empty(20, 40).T.copy_(c)  # column-major output: torch's GEMM writes it
    ops.gemm(a_strided, b, out=out, beta=1.0)
    _assert_within_gemm_bound(out, a, b, c, 1.0)


def test_beta_zero_ignores_nan_in_out():
    a, b, c = _operands(64, 48, 32, torch.float32)
    out = torch.full_like(c, float("nan"))
    ops.gemm(a, b, out=out)
    _assert_within_gemm_bound(out, a, b, c, 0.0)


def test_new_output_when_none_given():
    a, b, c = _operands(16, 8, 4, torch.float32)
    out = ops.gemm(a, b)
    assert out.shape == (16, 4) and out.dtype == torch.float32
    _assert_within_gemm_bound(out, a, b, c, 0.0)


@pytest.mark.parametrize("m,k,n", [(0, 5, 3), (4, 0, 3), (4, 5, 0)])
def test_empty_dimensions(m, k, n):
    a, b, c = _operands(m, k, n, torch.float32)
    out = c.clone()
    ops.gemm(a, b, out=out, beta=2.0)
    assert torch.equal(out, 2.0 * c)  # k = 0: nothing multiplied, beta still applies


def test_same_inputs_same_bits():
    a, b, c = _operands(512, 300, 100, torch.float32)
    first = ops.gemm(a, b, out=c.clone(), beta=1.0)
    second = ops.gemm(a, b, out=c.clone(), beta=1.0)
    assert torch.equal(first, second)


@needs_onednn
def test_float32_cpu_runs_through_onednn_by_default(monkeypatch):
    monkeypatch.delenv(ops.CPU_GEMM_ENV, raising=False)
    assert torch.ops.imc_kernels.gemm_uses_onednn()
    assert ops._cpu_gemm() == "onednn"
    calls = []
    monkeypatch.setattr(ref, "gemm", lambda *args, **kwargs: calls.append(args))
    a, b, c = _operands(256, 128, 64, torch.float32)  # 4.2 MFLOP, over ONEDNN_MIN_FLOPS
    ops.gemm(a, b, out=c)
    assert calls == []  # float32 on the CPU never reaches torch's GEMM
    ops.gemm(a.double(), b.double(), out=c.double())
    assert len(calls) == 1  # float64 does
    small = _operands(64, 32, 16, torch.float32)  # 66 kFLOP, under ONEDNN_MIN_FLOPS
    ops.gemm(small[0], small[1], out=small[2])
    assert len(calls) == 2  # and so does a small product


@needs_onednn
def test_raw_op_keeps_small_products_on_torch():
    a, b, c = _operands(64, 32, 16, torch.float32)
    out = c.clone()
    torch.ops.imc_kernels.gemm_out(a, b, 1.0, out)
    assert torch.equal(out, c.clone().addmm_(a, b))  # at::addmm_out, bit for bit
    a, b, c = _operands(300, 200, 100, torch.float32)
    out = c.clone()
    torch.ops.imc_kernels.gemm_out(a, b, 1.0, out)
    assert not torch.equal(out, c.clone().addmm_(a, b))  # oneDNN: other rounding
    _assert_within_gemm_bound(out, a, b, c, 1.0)


def test_environment_selects_torch_gemm(monkeypatch):
    monkeypatch.setenv(ops.CPU_GEMM_ENV, "torch")
    a, b, c = _operands(300, 200, 100, torch.float32)
    out = c.clone()
    ops.gemm(a, b, out=out, beta=1.0)
    assert torch.equal(out, c.clone().addmm_(a, b))  # torch's own GEMM, bit for bit


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(ops.CPU_GEMM_ENV, "mkl")
    a, b, _ = _operands(3, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="IMC_CPU_GEMM='mkl'"):
        ops.gemm(a, b)


BAD_INPUTS = [
    # (a, b, out, beta, exception of ops.gemm, words in both messages)
    (torch.zeros(3), torch.zeros(3, 2), None, 0.0, ValueError, "2-D"),
    (torch.zeros(3, 4), torch.zeros(5, 2), torch.zeros(3, 2), 0.0, ValueError, "chain"),
    (torch.zeros(3, 4), torch.zeros(4, 2), torch.zeros(2, 3), 0.0, ValueError, "shape|chain"),
    (
        torch.zeros(3, 4),
        torch.zeros(4, 2, dtype=torch.float64),
        torch.zeros(3, 2),
        0.0,
        TypeError,
        "dtype",
    ),
    (
        torch.zeros(3, 4, dtype=torch.int64),
        torch.zeros(4, 2, dtype=torch.int64),
        torch.zeros(3, 2, dtype=torch.int64),
        0.0,
        TypeError,
        "floating",
    ),
    (torch.zeros(3, 4), torch.zeros(4, 2), torch.zeros(3, 2), float("nan"), ValueError, "beta"),
]


@pytest.mark.parametrize("a,b,out,beta,error,words", BAD_INPUTS)
def test_bad_input_raises_through_ops(a, b, out, beta, error, words):
    with pytest.raises(error, match=words):
        ops.gemm(a, b, out=out, beta=beta)


@needs_extension
@pytest.mark.parametrize("a,b,out,beta,error,words", [x for x in BAD_INPUTS if x[2] is not None])
def test_bad_input_raises_through_raw_op(a, b, out, beta, error, words):
    with pytest.raises(RuntimeError, match=words):
        torch.ops.imc_kernels.gemm_out(a, b, beta, out)


def test_beta_without_out_is_refused():
    with pytest.raises(ValueError, match="no out"):
        ops.gemm(torch.zeros(2, 2), torch.zeros(2, 2), beta=1.0)


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("overlap", ["full", "partial"])
def test_output_sharing_an_operand_is_refused(raw, overlap):
    if raw and _ext.load().module is None:
        pytest.skip(f"C++ extension not loaded: {_ext.load().reason}")
    buffer = torch.randn(5, 4)
    a, b = buffer[:4], torch.randn(4, 4)
    out = a if overlap == "full" else buffer[1:]
    with pytest.raises((ValueError, RuntimeError), match="shares memory"):
        if raw:
            torch.ops.imc_kernels.gemm_out(a, b, 0.0, out)
        else:
            ops.gemm(a, b, out=out)


@pytest.mark.parametrize("raw", [False, True])
def test_interleaved_columns_of_one_buffer_run_through_torch(raw):
    """Disjoint column slices of one matrix: accepted, as torch's out= GEMMs accept them."""
    if raw and _ext.load().module is None:
        pytest.skip(f"C++ extension not loaded: {_ext.load().reason}")
    buffer = torch.randn(6, 8)
    a, out, b = buffer[:, :4], buffer[:, 4:], torch.randn(4, 4)
    expected = a @ b
    if raw:
        torch.ops.imc_kernels.gemm_out(a, b, 0.0, out)
    else:
        ops.gemm(a, b, out=out)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("raw", [False, True])
def test_disjoint_rows_of_one_buffer_are_accepted(raw):
    if raw and _ext.load().module is None:
        pytest.skip(f"C++ extension not loaded: {_ext.load().reason}")
    buffer = torch.randn(8, 4)
    a, b, out = buffer[:4], torch.randn(4, 4), buffer[4:]
    expected = a @ b
    if raw:
        torch.ops.imc_kernels.gemm_out(a, b, 0.0, out)
    else:
        ops.gemm(a, b, out=out)
    _assert_within_gemm_bound(out, a, b, torch.zeros(4, 4), 0.0)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


@needs_extension
def test_opcheck():
    a, b, c = _operands(37, 5, 3, torch.float32)
    samples = [
        (a, b, 0.0, c.clone()),
        (a, b, 0.5, c.clone()),
        (a.double(), b.double(), 1.0, c.double()),
        (a.T.contiguous().T, b, 0.0, c.clone()),
    ]
    for sample in samples:
        torch.library.opcheck(torch.ops.imc_kernels.gemm_out.default, sample)


@pytest.mark.parametrize("how", ["force_backend", "environment"])
def test_forced_reference_backend_selects_torch_gemm(how, monkeypatch):
    """The solver's twin forces the gemm family to torch's GEMM this way."""
    from imc_kernels import _dispatch

    a, b, c = _operands(300, 200, 100, torch.float32)
    out = c.clone()
    if how == "environment":
        monkeypatch.setenv(_dispatch.ENV_BACKEND, "reference")
        ops.gemm(a, b, out=out, beta=1.0)
    else:
        with _dispatch.force_backend("reference", ops=("gemm",)):
            ops.gemm(a, b, out=out, beta=1.0)
    assert torch.equal(out, c.clone().addmm_(a, b))


def test_operands_requiring_grad_keep_autograd():
    a, b, _ = _operands(20, 10, 5, torch.float32)
    a.requires_grad_(True)
    out = ops.gemm(a, b)
    out.sum().backward()
    assert torch.allclose(a.grad, b.sum(1).expand(20, 10), rtol=1e-6, atol=1e-6)
