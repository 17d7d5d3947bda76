"""Block-sparse linear products for masked layers (Triton): forward, input and weight grads.

The weight ``W`` (out_features, in_features) stays dense in memory; a :class:`BlockLayout`
lists the kept ``BLOCK x BLOCK`` tiles (see the twin ``imc_kernels/reference/block_sparse.py``
for the math and the layout). Each kernel reads only kept tiles, so its work and its weight
traffic scale with the kept fraction:

* ``_block_sparse_forward_kernel``: one program per (``BLOCK_M`` rows of ``x``, output
  block-row ``i``) walks the CSR list of row ``i`` and accumulates ``x[:, j] W_ij^T``;
* ``_block_sparse_grad_input_kernel``: one program per (rows, input block-column ``j``) walks
  the CSC list of column ``j`` and accumulates ``dy[:, i] W_ij``;
* ``_block_sparse_grad_weight_kernel``: one program per tile of ``W``; a kept tile reduces
  ``dy[:, i]^T x[:, j]`` over all rows (an SDDMM on the kept tiles), a pruned tile is written
  as zeros without reading anything.

Every output tile has exactly one owner program: no atomics, no split-K, so results are
run-to-run identical (kernel_design.md 2.4). fp32 operands use ``input_precision="ieee"``
(Triton's default would be TF32, ~1e-3 relative error, DESIGN section 6); fp16/bf16 operands
accumulate in fp32. Block sizes 16, 32 and 64 (``tl.dot`` needs 16; why not 128 is at
``TRITON_BLOCK_SIZES`` in the twin); the row tile ``BLOCK_M`` is 64 (128 rows for
``BLOCK=16``). Neither is tuned on hardware yet (no GPU measurement in this repository;
``torch/sparse/_triton_ops_meta.py`` tunes ``bsr_dense_mm`` per shape, the next step once one
is available).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from imc_kernels import _dispatch
from imc_kernels.reference.block_sparse import (
    BlockLayout,
    check_forward_inputs,
    check_grad_input_inputs,
    check_grad_weight_inputs,
    triton_unsupported_reason,
)

_NUM_WARPS = 4


# The loops over kept tiles have runtime bounds. Compiled, they are `for` loops, which
# Triton software-pipelines (the next tiles' loads overlap the current dot). The Triton 3.6
# interpreter converts a runtime `range` bound with int() of a 1-element array, which
# numpy >= 2.3 rejects, so under TRITON_INTERPRET the same step runs in a `while` loop (as in
# ops/activation.py). One step function per kernel keeps the two loops identical.


@triton.jit
def _forward_step(
    acc,
    x_rows,
    w_rows,
    cols_ptr,
    p,
    offs_b,
    rows_in,
    stride_xk,
    stride_wk,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block_col = tl.load(cols_ptr + p).to(tl.int64)
    offs_k = block_col * BLOCK + offs_b
    x_tile = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=rows_in[:, None], other=0.0)
    w_tile = tl.load(w_rows + offs_k[None, :] * stride_wk)  # (BLOCK out, BLOCK in)
    return tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=PRECISION)


@triton.jit
def _grad_input_step(
    acc,
    dy_rows,
    w_cols,
    t_rows_ptr,
    p,
    offs_b,
    rows_in,
    stride_dyn,
    stride_wn,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block_row = tl.load(t_rows_ptr + p).to(tl.int64)
    offs_n = block_row * BLOCK + offs_b
    dy_tile = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=rows_in[:, None], other=0.0)
    w_tile = tl.load(w_cols + offs_n[:, None] * stride_wn)  # (BLOCK out, BLOCK in)
    return tl.dot(dy_tile, w_tile, acc, input_precision=PRECISION)


@triton.jit
def _grad_weight_step(
    acc,
    dy_cols,
    x_cols,
    chunk,
    M,
    stride_dym,
    stride_xm,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m = chunk.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = offs_m[:, None] < M
    dy_tile = tl.load(dy_cols + offs_m[:, None] * stride_dym, mask=rows_in, other=0.0)
    x_tile = tl.load(x_cols + offs_m[:, None] * stride_xm, mask=rows_in, other=0.0)
    return tl.dot(tl.trans(dy_tile), x_tile, acc, input_precision=PRECISION)


@triton.jit
def _block_sparse_forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    row_offsets_ptr,
    cols_ptr,
    M,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    block_row = tl.program_id(1)
    # int64 row offsets: M * in_features passes 2^31 for a large batch of tokens.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = offs_m < M
    offs_b = tl.arange(0, BLOCK)
    offs_n = block_row.to(tl.int64) * BLOCK + offs_b
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    start = tl.load(row_offsets_ptr + block_row)
    end = tl.load(row_offsets_ptr + block_row + 1)
    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    # An all-pruned block-row runs zero iterations and stores the bias (or 0): the output is
    # always fully written.
    if INTERPRET:
        p = start
        while p < end:
            acc = _forward_step(
                acc,
                x_rows,
                w_rows,
                cols_ptr,
                p,
                offs_b,
                rows_in,
                stride_xk,
                stride_wk,
                BLOCK,
                INPUT_PRECISION,
            )
            p += 1
    else:
        for p in range(start, end):
            acc = _forward_step(
                acc,
                x_rows,
                w_rows,
                cols_ptr,
                p,
                offs_b,
                rows_in,
                stride_xk,
                stride_wk,
                BLOCK,
                INPUT_PRECISION,
            )
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=rows_in[:, None])


@triton.jit
def _block_sparse_grad_input_kernel(
    dy_ptr,
    w_ptr,
    dx_ptr,
    col_offsets_ptr,
    t_rows_ptr,
    M,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_dxm,
    stride_dxk,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    block_col = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = offs_m < M
    offs_b = tl.arange(0, BLOCK)
    offs_k = block_col.to(tl.int64) * BLOCK + offs_b
    dy_rows = dy_ptr + offs_m[:, None] * stride_dym
    w_cols = w_ptr + offs_k[None, :] * stride_wk
    # The CSC list of this input block-column: the transposed product reads the same tiles
    # as the forward, grouped by the tile's column so that each program owns its output.
    start = tl.load(col_offsets_ptr + block_col)
    end = tl.load(col_offsets_ptr + block_col + 1)
    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    if INTERPRET:
        p = start
        while p < end:
            acc = _grad_input_step(
                acc,
                dy_rows,
                w_cols,
                t_rows_ptr,
                p,
                offs_b,
                rows_in,
                stride_dyn,
                stride_wn,
                BLOCK,
                INPUT_PRECISION,
            )
            p += 1
    else:
        for p in range(start, end):
            acc = _grad_input_step(
                acc,
                dy_rows,
                w_cols,
                t_rows_ptr,
                p,
                offs_b,
                rows_in,
                stride_dyn,
                stride_wn,
                BLOCK,
                INPUT_PRECISION,
            )
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=rows_in[:, None])


@triton.jit
def _block_sparse_grad_weight_kernel(
    dy_ptr,
    x_ptr,
    dw_ptr,
    block_mask_ptr,
    M,
    n_block_cols,
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    stride_dwn,
    stride_dwk,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    tile = tl.program_id(0)
    block_row = tile // n_block_cols
    block_col = tile % n_block_cols
    offs_b = tl.arange(0, BLOCK)
    offs_n = block_row.to(tl.int64) * BLOCK + offs_b
    offs_k = block_col.to(tl.int64) * BLOCK + offs_b
    keep = tl.load(block_mask_ptr + tile) != 0
    # A pruned tile runs no iteration and stores zeros: the dense gradient is exactly 0 there
    # and no memset of the output is needed. The reduction over rows stays inside one
    # program (no split-K), so the sum order is fixed.
    n_chunks = tl.where(keep, tl.cdiv(M, BLOCK_M), 0)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    dy_cols = dy_ptr + offs_n[None, :] * stride_dyn
    x_cols = x_ptr + offs_k[None, :] * stride_xk
    if INTERPRET:
        chunk = 0
        while chunk < n_chunks:
            acc = _grad_weight_step(
                acc, dy_cols, x_cols, chunk, M, stride_dym, stride_xm, BLOCK_M, INPUT_PRECISION
            )
            chunk += 1
    else:
        for chunk in range(0, n_chunks):
            acc = _grad_weight_step(
                acc, dy_cols, x_cols, chunk, M, stride_dym, stride_xm, BLOCK_M, INPUT_PRECISION
            )
    dw_ptrs = dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty))


def _check_triton(layout: BlockLayout, dtype: torch.dtype) -> None:
    reason = triton_unsupported_reason(layout, dtype)
    if reason is not None:
        raise ValueError(reason)


def _meta(layout: BlockLayout, dtype: torch.dtype) -> dict:
    # fp32: exact products (no TF32). Half types: the flag does not apply; Triton's default.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    # A 16-wide tile gives each loop step only 64 x 16 x 16 MACs per weight tile loaded;
    # 128 rows double the reuse of that tile (the step still stages only 8 KiB in fp32).
    block_m = 128 if layout.block_size == 16 else 64
    return dict(
        BLOCK=layout.block_size,
        BLOCK_M=block_m,
        INPUT_PRECISION=precision,
        INTERPRET=_dispatch.triton_interpret(),
    )


def _output(out: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device) if out is None else out


def block_sparse_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout: BlockLayout,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launcher of :func:`imc_kernels.ops.block_sparse_forward`.

    Args:
        x: ``(M, in_features)``, any strides.
        weight: ``(out_features, in_features)``, any strides; pruned tiles are not read.
        bias: ``(out_features,)`` or None.
        layout: the kept tiles, on the weight's device.
        out: optional contiguous ``(M, out_features)`` buffer.

    Returns:
        ``y = x (W * mask)^T + b``, ``(M, out_features)``.

    Raises:
        TypeError, ValueError: see :func:`imc_kernels.reference.block_sparse.check_forward_inputs`;
            ValueError also for a block size or dtype the kernels do not take.
    """
    check_forward_inputs(x, weight, bias, layout, out)
    _check_triton(layout, weight.dtype)
    m = x.shape[0]
    y = _output(out, (m, layout.out_features), weight)
    if m == 0:
        return y
    meta = _meta(layout, weight.dtype)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), layout.grid[0])
    _block_sparse_forward_kernel[grid](
        x,
        weight,
        weight if bias is None else bias,  # never read without HAS_BIAS
        y,
        layout.row_offsets,
        layout.cols,
        m,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        num_warps=_NUM_WARPS,
        **meta,
    )
    return y


def block_sparse_grad_input(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    layout: BlockLayout,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launcher of :func:`imc_kernels.ops.block_sparse_grad_input`.

    Args:
        grad_output: ``dy``, ``(M, out_features)``, any strides.
        weight: ``(out_features, in_features)``, any strides.
        layout: the kept tiles.
        out: optional contiguous ``(M, in_features)`` buffer.

    Returns:
        ``dx = dy (W * mask)``, ``(M, in_features)``.

    Raises:
        TypeError, ValueError: see
            :func:`imc_kernels.reference.block_sparse.check_grad_input_inputs`.
    """
    check_grad_input_inputs(grad_output, weight, layout, out)
    _check_triton(layout, weight.dtype)
    m = grad_output.shape[0]
    dx = _output(out, (m, layout.in_features), weight)
    if m == 0:
        return dx
    meta = _meta(layout, weight.dtype)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), layout.grid[1])
    _block_sparse_grad_input_kernel[grid](
        grad_output,
        weight,
        dx,
        layout.col_offsets,
        layout.t_rows,
        m,
        grad_output.stride(0),
        grad_output.stride(1),
        weight.stride(0),
        weight.stride(1),
        dx.stride(0),
        dx.stride(1),
        num_warps=_NUM_WARPS,
        **meta,
    )
    return dx


def block_sparse_grad_weight(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    layout: BlockLayout,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launcher of :func:`imc_kernels.ops.block_sparse_grad_weight`.

    Args:
        grad_output: ``dy``, ``(M, out_features)``, any strides.
        x: the forward's input, ``(M, in_features)``, any strides.
        layout: the kept tiles.
        out: optional contiguous ``(out_features, in_features)`` buffer.

    Returns:
        Dense ``dW = (dy^T x) * mask``; pruned tiles are written as exact zeros.

    Raises:
        TypeError, ValueError: see
            :func:`imc_kernels.reference.block_sparse.check_grad_weight_inputs`.
    """
    check_grad_weight_inputs(grad_output, x, layout, out)
    _check_triton(layout, x.dtype)
    dw = _output(out, (layout.out_features, layout.in_features), x)
    n_rows, n_cols = layout.grid
    if n_rows * n_cols == 0:
        return dw
    meta = _meta(layout, x.dtype)
    _block_sparse_grad_weight_kernel[(n_rows * n_cols,)](
        grad_output,
        x,
        dw,
        # bool and uint8 share one byte per element; the view avoids Triton's i1 pointers.
        layout.block_mask.contiguous().view(torch.uint8),
        grad_output.shape[0],
        n_cols,
        grad_output.stride(0),
        grad_output.stride(1),
        x.stride(0),
        x.stride(1),
        dw.stride(0),
        dw.stride(1),
        num_warps=_NUM_WARPS,
        **meta,
    )
    return dw
