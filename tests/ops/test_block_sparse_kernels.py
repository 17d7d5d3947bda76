"""Block-sparse linear products: Triton launchers against the twin, the twin against
masked-dense products, the layout, and the dispatcher.

On CPU the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set by conftest);
shapes stay small (a few tiles) because the interpreter is slow.

Oracles. The twin is checked in float64 against ``F.linear(x, W * mask)``, ``dy (W * mask)``
and ``(dy^T x) * mask``: the same sums in another order, so they agree to ~1e-12 (float64 eps
2.2e-16 times at most a few hundred terms of size O(10)). The kernels run in float32 and are
checked against the twin in float32 and against the float64 oracle. Tolerance: each output
is a dot product of at most K = 128 (forward, input gradient) or M = 70 (weight gradient)
terms of products of standard normals; fp32 summation in any order errs by at most
K * eps * sum|terms| ~ 128 * 6e-8 * 128 = 1e-3 in the worst case and ~sqrt(K) * eps * |y| ~
1e-5 typically, so ``rtol = atol = 1e-4`` leaves 10x room over the typical error while still
failing for any wrong, missing or extra tile (errors of O(1)).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imc_kernels import _dispatch, ops
from imc_kernels.reference import block_sparse as ref

pytest.importorskip("triton")
from imc_kernels.ops import block_sparse as triton_bs  # noqa: E402

FP32 = dict(rtol=1e-4, atol=1e-4)
FP64 = dict(rtol=1e-12, atol=1e-12)

# (rows M, out_features, in_features, block_size, pattern). 70 rows: one full 64-row tile
# plus a partial one; 37: a single partial tile with the 128-row tiles of block 16; 1: a
# single row. Patterns: "random" keeps ~half the tiles and prunes block-row 1 and block-column
# 2 entirely; "dense" keeps all, "empty" none, "diagonal" one tile per row and column.
CASES = [
    (70, 64, 96, 16, "random"),
    (37, 64, 128, 32, "random"),
    (1, 48, 32, 16, "random"),
    (33, 32, 64, 16, "dense"),
    (20, 32, 48, 16, "empty"),
    (9, 64, 64, 32, "diagonal"),
]


def _block_mask(n_rows, n_cols, pattern, seed=3):
    if pattern == "dense":
        return torch.ones(n_rows, n_cols, dtype=torch.bool)
    if pattern == "empty":
        return torch.zeros(n_rows, n_cols, dtype=torch.bool)
    if pattern == "diagonal":
        return torch.eye(n_rows, n_cols, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_rows, n_cols, generator=gen) < 0.5
    mask[0, 0] = True
    if n_rows > 1:
        mask[1] = False
    if n_cols > 2:
        mask[:, 2] = False
    return mask


def _problem(m, out_features, in_features, block_size, pattern, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grid = (out_features // block_size, in_features // block_size)
    block_mask = _block_mask(*grid, pattern)
    layout = ref.block_layout(block_mask, block_size)
    mask = ref.expand_block_mask(block_mask, block_size)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    x, weight, bias = randn(m, in_features), randn(out_features, in_features), randn(out_features)
    grad_output = randn(m, out_features)
    return layout, mask, x, weight, bias, grad_output


def _with_nan_in_pruned_tiles(weight, mask):
    # The kernels must never read a pruned tile: NaN there would reach every output it touched.
    poisoned = weight.clone()
    poisoned[~mask] = float("nan")
    return poisoned


def _poisoned(*shape):
    return torch.full(shape, float("nan"))


def _dense_oracle(layout, mask, x, weight, bias, grad_output):
    x, grad_output = x.double(), grad_output.double()
    masked = weight.double() * mask
    forward = F.linear(x, masked, None if bias is None else bias.double())
    return forward, grad_output @ masked, (grad_output.T @ x) * mask


# --- Twin against masked-dense products ------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 3, 5])
@pytest.mark.parametrize("pattern", ["random", "dense", "empty"])
def test_reference_matches_masked_dense_odd_blocks(block_size, pattern):
    out_features, in_features = 4 * block_size, 6 * block_size
    layout, mask, x, weight, bias, dy = _problem(
        13, out_features, in_features, block_size, pattern, dtype=torch.float64
    )
    weight = _with_nan_in_pruned_tiles(weight, mask)
    expected = _dense_oracle(layout, mask, x, weight.nan_to_num(), bias, dy)
    torch.testing.assert_close(
        ref.block_sparse_forward(x, weight, bias, layout), expected[0], **FP64
    )
    torch.testing.assert_close(ref.block_sparse_grad_input(dy, weight, layout), expected[1], **FP64)
    dw = ref.block_sparse_grad_weight(dy, x, layout)
    torch.testing.assert_close(dw, expected[2], **FP64)
    assert torch.equal(dw[~mask], torch.zeros(int((~mask).sum()), dtype=dw.dtype))


# --- Kernels against the twin and the float64 oracle -----------------------------------------


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-M{c[0]}-b{c[3]}" for c in CASES])
def test_forward_matches_reference(case, has_bias):
    layout, mask, x, weight, bias, dy = _problem(*case)
    bias = bias if has_bias else None
    weight = _with_nan_in_pruned_tiles(weight, mask)
    out = _poisoned(x.shape[0], layout.out_features)
    y = triton_bs.block_sparse_forward(x, weight, bias, layout, out=out)
    assert y is out
    torch.testing.assert_close(y, ref.block_sparse_forward(x, weight, bias, layout), **FP32)
    expected = _dense_oracle(layout, mask, x, weight.nan_to_num(), bias, dy)[0]
    torch.testing.assert_close(y.double(), expected, **FP32)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-M{c[0]}-b{c[3]}" for c in CASES])
def test_grad_input_matches_reference(case):
    layout, mask, x, weight, bias, dy = _problem(*case)
    weight = _with_nan_in_pruned_tiles(weight, mask)
    out = _poisoned(dy.shape[0], layout.in_features)
    dx = triton_bs.block_sparse_grad_input(dy, weight, layout, out=out)
    assert dx is out
    torch.testing.assert_close(dx, ref.block_sparse_grad_input(dy, weight, layout), **FP32)
    expected = _dense_oracle(layout, mask, x, weight.nan_to_num(), bias, dy)[1]
    torch.testing.assert_close(dx.double(), expected, **FP32)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-M{c[0]}-b{c[3]}" for c in CASES])
def test_grad_weight_matches_reference(case):
    layout, mask, x, weight, bias, dy = _problem(*case)
    out = _poisoned(layout.out_features, layout.in_features)
    dw = triton_bs.block_sparse_grad_weight(dy, x, layout, out=out)
    assert dw is out
    torch.testing.assert_close(dw, ref.block_sparse_grad_weight(dy, x, layout), **FP32)
    expected = _dense_oracle(layout, mask, x, weight, bias, dy)[2]
    torch.testing.assert_close(dw.double(), expected, **FP32)
    # Pruned tiles are written as exact zeros (not left as the NaN of the poisoned buffer).
    assert torch.equal(dw[~mask], torch.zeros(int((~mask).sum())))


def test_kernels_take_strided_operands():
    # Transposed views (unit stride along rows) and a column slice: the launchers pass strides
    # instead of copying.
    layout, mask, x, weight, bias, dy = _problem(40, 32, 64, 16, "random", seed=5)
    x_t = x.t().contiguous().t()
    weight_t = weight.t().contiguous().t()
    dy_wide = torch.cat([dy, torch.randn(40, 7)], dim=1)[:, :32]
    torch.testing.assert_close(
        triton_bs.block_sparse_forward(x_t, weight_t, bias, layout),
        ref.block_sparse_forward(x, weight, bias, layout),
        **FP32,
    )
    torch.testing.assert_close(
        triton_bs.block_sparse_grad_input(dy_wide, weight_t, layout),
        ref.block_sparse_grad_input(dy, weight, layout),
        **FP32,
    )
    torch.testing.assert_close(
        triton_bs.block_sparse_grad_weight(dy_wide, x_t, layout),
        ref.block_sparse_grad_weight(dy, x, layout),
        **FP32,
    )


def test_zero_rows():
    layout, mask, x, weight, bias, dy = _problem(3, 32, 32, 16, "random")
    empty = x[:0]
    assert triton_bs.block_sparse_forward(empty, weight, bias, layout).shape == (0, 32)
    assert triton_bs.block_sparse_grad_input(dy[:0], weight, layout).shape == (0, 32)
    dw = triton_bs.block_sparse_grad_weight(dy[:0], empty, layout)
    assert torch.equal(dw, torch.zeros(32, 32))


def test_kernels_deterministic():
    # One owner program per output tile, no atomics: the same inputs give the same bits.
    layout, mask, x, weight, bias, dy = _problem(70, 64, 96, 16, "random", seed=9)
    runs = [
        (
            triton_bs.block_sparse_forward(x, weight, bias, layout),
            triton_bs.block_sparse_grad_input(dy, weight, layout),
            triton_bs.block_sparse_grad_weight(dy, x, layout),
        )
        for _ in range(2)
    ]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_cuda_kernels_match_reference(dtype, block_size):
    # Compiled kernels on a GPU against the float64 twin. Half types: operands rounded to
    # 8 (bf16) or 11 (fp16) bits, fp32 accumulation over 512 terms: errors up to ~1e-2
    # relative; fp32 with input_precision="ieee": as on CPU.
    torch.manual_seed(0)
    m, out_features, in_features = 300, 4 * block_size, 6 * block_size
    block_mask = _block_mask(4, 6, "random")
    layout = ref.block_layout(block_mask, block_size).to("cuda")
    x = torch.randn(m, in_features, device="cuda")
    weight = torch.randn(out_features, in_features, device="cuda")
    bias = torch.randn(out_features, device="cuda")
    dy = torch.randn(m, out_features, device="cuda")
    tol = FP32 if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-1)
    args = [t.to(dtype) for t in (x, weight, bias, dy)]
    x64, w64, b64, dy64 = (t.double() for t in args)
    layout64 = layout
    torch.testing.assert_close(
        triton_bs.block_sparse_forward(args[0], args[1], args[2], layout).double(),
        ref.block_sparse_forward(x64, w64, b64, layout64),
        **tol,
    )
    torch.testing.assert_close(
        triton_bs.block_sparse_grad_input(args[3], args[1], layout).double(),
        ref.block_sparse_grad_input(dy64, w64, layout64),
        **tol,
    )
    torch.testing.assert_close(
        triton_bs.block_sparse_grad_weight(args[3], args[0], layout).double(),
        ref.block_sparse_grad_weight(dy64, x64, layout64),
        **tol,
    )


# --- Layout ----------------------------------------------------------------------------------


def test_layout_indexes_rows_and_columns():
    block_mask = torch.tensor(
        [
            [True, False, True],
            [False, False, False],
            [True, True, False],
        ]
    )
    layout = ref.block_layout(block_mask, 4)
    assert (layout.out_features, layout.in_features, layout.grid) == (12, 12, (3, 3))
    assert layout.n_kept == 4 and layout.density == pytest.approx(4 / 9)
    # Row-major: (0,0), (0,2), (2,0), (2,1).
    assert layout.rows.tolist() == [0, 0, 2, 2]
    assert layout.cols.tolist() == [0, 2, 0, 1]
    assert layout.row_offsets.tolist() == [0, 2, 2, 4]
    # Column-major: column 0 has rows 0 and 2, column 1 row 2, column 2 row 0.
    assert layout.col_offsets.tolist() == [0, 2, 3, 4]
    assert layout.t_rows.tolist() == [0, 2, 2, 0]
    assert all(t.dtype == torch.int32 for t in (layout.rows, layout.cols, layout.t_rows))
    assert layout.to("cpu") is layout


def test_block_mask_from_element_mask_round_trip():
    block_mask = _block_mask(3, 5, "random")
    element = ref.expand_block_mask(block_mask, 4)
    assert element.shape == (12, 20)
    assert torch.equal(ref.block_mask_from_mask(element, 4, "test"), block_mask)
    element[0, 0] = not bool(element[0, 0])  # one weight flipped: no longer block-structured
    with pytest.raises(ValueError, match=r"not block-structured .* tile \(0, 0\)"):
        ref.block_mask_from_mask(element, 4, "test")


def test_block_shape_must_divide():
    with pytest.raises(ValueError, match=r"in_features = 100 \(remainder 4\)"):
        ref.check_block_shape(64, 100, 16, "layer")
    with pytest.raises(ValueError, match="gcd of 48 and 40"):
        ref.check_block_shape(48, 40, 16, "layer")
    with pytest.raises(TypeError, match="block_size must be an int"):
        ref.check_block_shape(64, 64, 16.0, "layer")
    with pytest.raises(ValueError, match="at least 1"):
        ref.check_block_shape(64, 64, 0, "layer")


# --- Dispatch and bad input ------------------------------------------------------------------


def test_dispatch_picks_triton_or_reference(monkeypatch):
    layout, mask, x, weight, bias, dy = _problem(5, 48, 48, 16, "random")
    monkeypatch.delenv(_dispatch.ENV_BACKEND, raising=False)
    assert ops.block_sparse_backend(weight, layout) == "triton"  # interpreter, fp32, block 16
    assert ops.block_sparse_backend(weight.double(), layout) == "reference"
    odd = ref.block_layout(layout.block_mask, 24)  # 24: no Triton kernel
    assert ops.block_sparse_backend(torch.empty(72, 72), odd) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.block_sparse_backend(weight, layout) == "reference"


def test_forced_triton_raises_with_the_reason(monkeypatch):
    layout = ref.block_layout(torch.ones(2, 2, dtype=torch.bool), 24)
    weight, x = torch.randn(48, 48), torch.randn(3, 48)
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "triton")
    with pytest.raises(_dispatch.BackendUnavailableError, match=r"block sizes \(16, 32"):
        ops.block_sparse_forward(x, weight, None, layout)
    layout16 = ref.block_layout(torch.ones(3, 3, dtype=torch.bool), 16)
    with pytest.raises(_dispatch.BackendUnavailableError, match="float32/float16/bfloat16"):
        ops.block_sparse_grad_weight(torch.randn(3, 48).double(), x.double(), layout16)
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "reference")
    expected = F.linear(x, weight)
    torch.testing.assert_close(ops.block_sparse_forward(x, weight, None, layout), expected)


def test_dispatched_backends_agree(monkeypatch):
    layout, mask, x, weight, bias, dy = _problem(21, 32, 48, 16, "random", seed=4)
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv(_dispatch.ENV_BACKEND, backend)
        results[backend] = (
            ops.block_sparse_forward(x, weight, bias, layout),
            ops.block_sparse_grad_input(dy, weight, layout),
            ops.block_sparse_grad_weight(dy, x, layout),
        )
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_input(impl):
    module = ref if impl == "reference" else triton_bs
    layout, mask, x, weight, bias, dy = _problem(5, 32, 48, 16, "random")
    with pytest.raises(ValueError, match=r"weight has shape \(48, 32\)"):
        module.block_sparse_forward(x, weight.t(), bias, layout)
    with pytest.raises(ValueError, match=r"x must have shape \(M, 48\)"):
        module.block_sparse_forward(x[:, :40], weight, bias, layout)
    with pytest.raises(TypeError, match="x is torch.float64 but the weight is torch.float32"):
        module.block_sparse_forward(x.double(), weight, bias, layout)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        module.block_sparse_forward(x, weight, bias[:7], layout)
    with pytest.raises(TypeError, match="layout must be a BlockLayout"):
        module.block_sparse_grad_input(dy, weight, layout.block_mask)
    with pytest.raises(ValueError, match="x has 4 rows but grad_output has 5"):
        module.block_sparse_grad_weight(dy, x[:4], layout)
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \(5, 32\)"):
        module.block_sparse_forward(x, weight, bias, layout, out=torch.empty(5, 31))
    with pytest.raises(TypeError, match="floating-point"):
        module.block_sparse_grad_input(dy.long(), weight, layout)
    if impl == "triton":
        odd = ref.block_layout(torch.ones(2, 2, dtype=torch.bool), 24)
        with pytest.raises(ValueError, match="block sizes"):
            triton_bs.block_sparse_forward(torch.randn(3, 48), torch.randn(48, 48), None, odd)


def test_bad_layout_input():
    with pytest.raises(TypeError, match="bool"):
        ref.block_layout(torch.ones(2, 2), 16)
    with pytest.raises(ValueError, match="2-D"):
        ref.block_layout(torch.ones(4, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="at least 1"):
        ref.block_layout(torch.ones(2, 2, dtype=torch.bool), 0)
