"""``imc_kernels::tsmm_xty`` (csrc/lanczos/): x^T y with fp64 accumulation, deterministic.

Oracle: the fp64 GEMM of the upcast inputs (the reference twin). Tolerance: fp32 inputs
multiply exactly in fp64 (24 + 24 significand bits < 53), so the kernel and the oracle differ
only in how they sum n products; each sum is within ``n * eps64 * (|x|^T |y|)`` of the exact
value (Higham's bound for recursive summation, which also covers blocked orders), so the two
differ by at most twice that. For fp64 inputs each product adds one rounding, covered by the
same bound (n >= 1).
"""

from __future__ import annotations

import pytest
import torch

from imc_kernels import _dispatch, _ext, ops
from imc_kernels.reference import tsmm as ref

EPS64 = torch.finfo(torch.float64).eps
_oracle = ref.tsmm_xty  # bound at import: some tests replace ref.tsmm_xty with a spy

# Aligned and awkward shapes: n around the CPU tile (a few hundred rows) and chunk (4096 rows)
# sizes and far beyond them; m and b around the micro-kernel's 4 x 8 register block and the
# CUDA kernel's 32 x 32 tile, up to the 512-column limit.
SHAPES = [
    (1, 1, 1),
    (1, 512, 3),
    (1000, 3, 33),
    (1000, 33, 16),
    (1000, 16, 1),
    (4097, 1, 128),
    (4097, 128, 16),
    (4097, 512, 512),
    (100003, 16, 3),
    (100003, 128, 16),
    (100003, 33, 1),
    (100003, 70, 1),
    # The skinny kernel (2-8 columns on one side, padded to 2, 4 or 8): rows in blocks of 8
    # plus a remainder, full 8-column vectors plus a tail (4: its own load; others: scalar).
    (100003, 124, 4),
    (4099, 37, 2),
    (1000, 4, 4),
    (4097, 8, 8),
    (4097, 5, 200),
    (10, 3, 6),
    # One column against one column: dotted in place (8-wide vectors plus a tail).
    (100003, 1, 1),
    (7, 1, 1),
]
DTYPES = [torch.float32, torch.float64]


def _extension_loaded() -> bool:
    return _ext.load().module is not None


needs_extension = pytest.mark.skipif(
    not _extension_loaded(), reason=f"C++ extension not loaded: {_ext.load().reason}"
)


def _inputs(n, m, b, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(n, b, generator=gen, dtype=torch.float64).to(dtype)
    return x.to(device), y.to(device)


def _assert_matches_oracle(out, x, y):
    """``out`` equals the fp64 oracle within the summation bound (module docstring)."""
    assert out.dtype == torch.float64
    assert out.shape == (x.shape[1], y.shape[1])
    expected = _oracle(x, y)
    bound = 2 * max(x.shape[0], 1) * EPS64 * (x.double().abs().T @ y.double().abs())
    if out.numel():
        error = (out - expected).abs()
        assert (error <= bound).all(), f"max error {error.max().item():.3e} above the bound"


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,b", SHAPES)
def test_raw_op_matches_fp64_oracle(n, m, b, dtype, device):
    x, y = _inputs(n, m, b, dtype, device)
    _assert_matches_oracle(torch.ops.imc_kernels.tsmm_xty(x, y), x, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,b", SHAPES[:6])
def test_dispatched_op_matches_fp64_oracle(n, m, b, dtype, device):
    # Runs whichever backend the dispatcher picks (the extension when loaded).
    x, y = _inputs(n, m, b, dtype, device, seed=1)
    _assert_matches_oracle(ops.tsmm_xty(x, y), x, y)


@needs_extension
@pytest.mark.parametrize(
    "x_shape,y_shape", [((0, 4), (0, 3)), ((5, 0), (5, 3)), ((5, 4), (5, 0)), ((0, 0), (0, 0))]
)
def test_empty_dimensions_give_zeros(x_shape, y_shape, device):
    x = torch.randn(x_shape, device=device)
    y = torch.randn(y_shape, device=device)
    out = torch.ops.imc_kernels.tsmm_xty(x, y)
    assert out.dtype == torch.float64
    assert out.shape == (x_shape[1], y_shape[1])
    assert torch.equal(out, torch.zeros_like(out))


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, device):
    gen = torch.Generator().manual_seed(2)
    x_storage = torch.randn(33, 5003, generator=gen, dtype=dtype).to(device)
    y_storage = torch.randn(5003, 14, generator=gen, dtype=dtype).to(device)
    x = x_storage.T  # (5003, 33), column-major
    y = y_storage[:, ::2]  # (5003, 7), strided columns
    assert not x.is_contiguous() and not y.is_contiguous()
    _assert_matches_oracle(torch.ops.imc_kernels.tsmm_xty(x, y), x, y)


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 5003])
def test_column_slices_of_a_wider_buffer(dtype, n, device):
    # The Lanczos basis case: middle and leading column slices of one row-major buffer, read
    # through their row stride (in place on the CPU), against the oracle on copies.
    gen = torch.Generator().manual_seed(6)
    buffer = torch.randn(n, 40, generator=gen, dtype=dtype).to(device)
    for x, y in [
        (buffer[:, 3:20], buffer[:, 25:29]),
        (buffer[:, :8], buffer[:, 30:31]),
        (buffer[:, 10:11], buffer[:, :36]),
    ]:
        assert n == 1 or not x.is_contiguous()
        out = torch.ops.imc_kernels.tsmm_xty(x, y)
        _assert_matches_oracle(out, x.contiguous(), y.contiguous())


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(1, 3), (7, 2), (4097, 9), (100003, 31)])
def test_column_major_x_against_one_column(dtype, n, m, device):
    # Single-vector Lanczos stores its basis transposed: x's columns are contiguous rows of a
    # wider buffer. The CPU kernel dots them in place (groups of 8 columns plus the rest,
    # 8-wide vectors plus a tail); the result must match the oracle on copies.
    gen = torch.Generator().manual_seed(7)
    storage = torch.randn(m + 3, n + 5, generator=gen, dtype=dtype).to(device)
    x = storage[:m, 2 : n + 2].T  # (n, m), stride (1, n + 5)
    y = torch.randn(n, 1, generator=gen, dtype=dtype).to(device)
    out = torch.ops.imc_kernels.tsmm_xty(x, y)
    _assert_matches_oracle(out, x.contiguous(), y)


@needs_extension
@pytest.mark.parametrize("n,m,b", [(100003, 128, 16), (4097, 33, 3)])
def test_same_inputs_same_bits(n, m, b, device):
    x, y = _inputs(n, m, b, torch.float32, device, seed=3)
    first = torch.ops.imc_kernels.tsmm_xty(x, y)
    second = torch.ops.imc_kernels.tsmm_xty(x, y)
    assert torch.equal(first, second)


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(7, 9), (1000, 13), (4097, 64), (100003, 33), (2000, 512)])
@pytest.mark.parametrize("layout", ["contiguous", "column_slice"])
def test_gram_of_one_operand_equals_the_general_product(dtype, n, m, layout):
    """``x^T x`` with x passed twice takes the symmetric path of the CPU kernel (blocks above
    the diagonal only, mirrored); it must be bitwise the product of x with a copy of itself
    (the general path), symmetric, and right against the fp64 oracle."""
    x, _ = _inputs(n, m, 1, dtype, seed=11)
    if layout == "column_slice":
        wider = torch.randn(n, m + 5, dtype=dtype)
        wider[:, 2 : 2 + m] = x
        x = wider[:, 2 : 2 + m]
    gram = torch.ops.imc_kernels.tsmm_xty(x, x)
    general = torch.ops.imc_kernels.tsmm_xty(x, x.clone())
    assert torch.equal(gram, general)
    assert torch.equal(gram, gram.T)
    _assert_matches_oracle(gram, x.contiguous(), x.contiguous())


@needs_extension
# (70, 1) and (1, 70): the narrow single-column kernel, one full column group plus a tail;
# (124, 4) and (6, 37): the skinny kernel, either way round.
@pytest.mark.parametrize("m,b", [(64, 8), (70, 1), (1, 70), (124, 4), (6, 37), (21, -1), (1, 1)])
def test_bits_do_not_depend_on_thread_count(m, b):
    # b = -1: a column-major x against one column (the transposed single-vector basis).
    x, y = _inputs(100003, m, abs(b), torch.float32, seed=4)
    if b < 0:
        x = x.T.contiguous().T
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.imc_kernels.tsmm_xty(x, y)
        torch.set_num_threads(max(threads, 2))
        multi = torch.ops.imc_kernels.tsmm_xty(x, y)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


# Shapes of the general kernel (both sides wider than 8 columns): Grams whose padded width is a
# multiple of 8 and one that leaves a trailing 4-row register block, products either way.
_TILE_CASES = [
    (4097, 64, 64, "gram"),
    (4097, 36, 36, "gram"),
    (1000, 12, 44, "product"),
    (100003, 132, 16, "product"),
    (3001, 20, 9, "product"),
]

_TILE_SCRIPT = """
import sys, torch
from imc_kernels import _ext
_ext.load()
out = []
for index, (n, m, b, kind) in enumerate({cases!r}):
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(100 + index)
        x = torch.randn(n, m + 3, generator=g, dtype=dtype)[:, 1 : 1 + m]
        y = x if kind == "gram" else torch.randn(n, b, generator=g, dtype=dtype)
        out.append(torch.ops.imc_kernels.tsmm_xty(x, y))
torch.save(out, sys.argv[1])
"""


@needs_extension
def test_avx512_tile_kernel_gives_the_portable_kernels_bits(tmp_path):
    """Where the CPU has AVX-512 the general kernel's tiles run an 8-row register block; it
    must give bitwise the results of the portable 4-row block (same blocks, same order per
    element), which IMC_KERNELS_NO_AVX512=1 selects."""
    import os
    import subprocess
    import sys

    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512: only the portable tile kernel exists here")
    script = _TILE_SCRIPT.format(cases=_TILE_CASES)
    results = {}
    for label, flag in (("avx512", "0"), ("portable", "1")):
        path = tmp_path / f"{label}.pt"
        env = {**os.environ, "IMC_KERNELS_NO_AVX512": flag}
        done = subprocess.run(
            [sys.executable, "-c", script, str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results[label] = torch.load(path)
    assert len(results["avx512"]) == 2 * len(_TILE_CASES)
    for fast, portable in zip(results["avx512"], results["portable"], strict=True):
        assert torch.equal(fast, portable)


@needs_extension
def test_no_stale_values_after_a_previous_call(device):
    # The op returns a fresh tensor, so NaN-poisoning an output is not possible; instead a
    # call with huge values runs first, its result is freed (the caching allocator may hand
    # the same memory back), and a second call must still match its own oracle everywhere.
    x_big, y_big = _inputs(4097, 33, 17, torch.float32, device, seed=5)
    del_me = torch.ops.imc_kernels.tsmm_xty(x_big * 1e6, y_big * 1e6)
    del del_me
    x, y = _inputs(4097, 33, 17, torch.float32, device, seed=6)
    _assert_matches_oracle(torch.ops.imc_kernels.tsmm_xty(x, y), x, y)


@needs_extension
def test_fp64_accumulation_beats_fp32_gemm_under_cancellation(device):
    # Columns of x are 1000 + a signal in [0, 1), columns of y are centred: the 1000 * sum(y)
    # part cancels, so the result (~1e2) is 1e6 times smaller than the sum of |terms| (~1e8).
    # fp32 accumulation loses ~eps32 * 1e8 ~ 10 absolute (percent-level relative error);
    # fp64 accumulation of the exact fp32 products loses ~eps64 * 1e8 ~ 1e-8 absolute.
    gen = torch.Generator().manual_seed(7)
    n = 100003
    x = (1000.0 + torch.rand(n, 4, generator=gen, dtype=torch.float64)).float()
    z = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = (z - z.mean(0)).float()
    x, y = x.to(device), y.to(device)
    exact = _oracle(x, y)
    ours = torch.ops.imc_kernels.tsmm_xty(x, y)
    fp32_gemm = (x.T @ y).double()
    ours_error = ((ours - exact).norm() / exact.norm()).item()
    gemm_error = ((fp32_gemm - exact).norm() / exact.norm()).item()
    assert ours_error < 1e-9, ours_error
    assert gemm_error > 1e-5, gemm_error  # measured ~9e-3 on CPU (MKL)
    assert gemm_error > 1e4 * ours_error


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(37, 5, generator=gen)
    return [
        (x.to(device), torch.randn(37, 3, generator=gen).to(device)),
        (x.double().to(device), torch.randn(37, 1, generator=gen).double().to(device)),
        (
            torch.randn(9, 37, generator=gen).T.to(device),
            torch.randn(37, 2, generator=gen).to(device),
        ),
        (torch.randn(0, 4).to(device), torch.randn(0, 2).to(device)),
    ]


@needs_extension
def test_opcheck(device):
    for x, y in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.imc_kernels.tsmm_xty.default, (x, y))


BAD_INPUTS = [
    # (x, y, exception of ops.tsmm_xty, words in both messages)
    (torch.zeros(10), torch.zeros(10, 2), ValueError, "2-D"),
    (torch.zeros(10, 2), torch.zeros(11, 2), ValueError, "rows"),
    (torch.zeros(4, 513), torch.zeros(4, 2), ValueError, "512"),
    (torch.zeros(4, 2), torch.zeros(4, 600), ValueError, "512"),
    (
        torch.zeros(4, 2, dtype=torch.int32),
        torch.zeros(4, 2, dtype=torch.int32),
        TypeError,
        "float32",
    ),
    (torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.float64), TypeError, "float64|Double"),
]


@pytest.mark.parametrize("x,y,error,words", BAD_INPUTS)
def test_bad_input_raises_through_ops(x, y, error, words):
    with pytest.raises(error, match=words):
        ops.tsmm_xty(x, y)


@needs_extension
@pytest.mark.parametrize("x,y,error,words", BAD_INPUTS)
def test_bad_input_raises_through_raw_op(x, y, error, words):
    with pytest.raises(RuntimeError, match=words):
        torch.ops.imc_kernels.tsmm_xty(x, y)


def test_reference_forced_by_environment(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "reference")
    calls = []

    def spy(x, y):
        calls.append(x.shape)
        return x.double().T @ y.double()

    monkeypatch.setattr(ref, "tsmm_xty", spy)
    x, y = _inputs(50, 3, 2, torch.float32)
    ops.tsmm_xty(x, y)
    assert calls == [(50, 3)]


@needs_extension
def test_extension_forced_by_environment(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "cext")

    def must_not_run(x, y):
        raise AssertionError("the reference ran although IMC_KERNELS_BACKEND=cext")

    monkeypatch.setattr(ref, "tsmm_xty", must_not_run)
    x, y = _inputs(50, 3, 2, torch.float32)
    _assert_matches_oracle(ops.tsmm_xty(x, y), x, y)


def test_forced_extension_raises_when_unavailable(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "cext")
    missing = _ext.ExtInfo(None, "none", False, "not built in this test")
    monkeypatch.setattr(_ext, "load", lambda: missing)
    x, y = _inputs(5, 3, 2, torch.float32)
    with pytest.raises(_dispatch.BackendUnavailableError, match="not built in this test"):
        ops.tsmm_xty(x, y)
