"""Pure-PyTorch twin of ``imc_kernels/ops/block_sparse.py``: block-sparse linear products.

A weight ``W`` of shape ``(out_features, in_features)`` is cut into square ``block_size`` tiles;
a bool *block mask* of shape ``(out_features // block_size, in_features // block_size)`` says
which tiles are kept. Pruned tiles are never read: the products below equal the masked-dense
ones with ``W * mask`` (``mask`` the block mask expanded to elements), whatever values the
pruned tiles of ``W`` hold.

* forward:      ``y = x (W * mask)^T + b``        ``x (M, in) -> y (M, out)``
* input grad:   ``dx = dy (W * mask)``            ``dy (M, out) -> dx (M, in)``
* weight grad:  ``dW = (dy^T x) * mask``          dense ``(out, in)``, exact zeros on pruned tiles

The weight gradient is returned dense (zeros outside the kept tiles) rather than as compact
tiles: the layer's parameter is the dense ``nn.Linear`` weight, so optimizers, masks of
``imc_prune`` and the masked optimizers of :mod:`imc_kernels.masked` see the same tensor as
on the masked-dense path. Only kept tiles are computed; the pruned ones are written as zeros.

:class:`BlockLayout` holds the kept tiles in two orders: row-major (per output block-row, CSR
``row_offsets``/``cols``) for the forward and the weight gradient, and column-major (per input
block-column, CSC ``col_offsets``/``t_rows``) for the input gradient ``dy W``, whose outputs
are input block-columns. Every output tile is then written by exactly one program of the
Triton kernels, so no atomics are needed and results are deterministic.

The twin loops over the same segments as the kernels' programs (block-rows for the forward
and the weight gradient, block-columns for the input gradient) and runs one GEMM per segment
on the gathered kept tiles. Summation orders differ from the kernels' and from a dense
product, so they agree to fp32 rounding of a length-``in_features`` (or ``M``) dot product,
not bit for bit.
"""

from __future__ import annotations

import dataclasses
import math

import torch

#: Block sizes of the Triton kernels. ``tl.dot`` needs tiles of at least 16. Each loop step
#: stages a whole weight tile and a ``64 x block_size`` input tile in shared memory: 32 KiB
#: in fp32 at 64, times Triton's 2-3 pipeline stages, within every sm80+ GPU's budget; at 128
#: it would be 96 KiB per stage (and a 64 KiB fp32 accumulator tile for the weight gradient),
#: which needs the tile split along K first. Other sizes run the twin.
TRITON_BLOCK_SIZES = (16, 32, 64)
#: Dtypes of the Triton kernels (tl.dot operands; fp32 accumulation).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_block_shape(out_features: int, in_features: int, block_size: int, what: str) -> None:
    """Raise unless ``block_size`` tiles the ``(out_features, in_features)`` weight exactly.

    Args:
        out_features: rows of the weight.
        in_features: columns of the weight.
        block_size: edge of the square tiles.
        what: the caller, for the message.

    Raises:
        TypeError: ``block_size`` is not an int.
        ValueError: ``block_size < 1``, or it divides neither dimension exactly.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{what}: block_size must be an int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"{what}: block_size must be at least 1, got {block_size}")
    bad = [
        f"{name} = {size} (remainder {size % block_size})"
        for name, size in (("out_features", out_features), ("in_features", in_features))
        if size % block_size
    ]
    if bad:
        common = math.gcd(out_features, in_features)
        raise ValueError(
            f"{what}: block_size {block_size} must divide both weight dimensions; "
            f"{' and '.join(bad)} are not multiples of it. Choose a block size dividing "
            f"{common} (the gcd of {out_features} and {in_features}), or pad the layer"
        )


def block_mask_from_mask(mask: torch.Tensor, block_size: int, what: str) -> torch.Tensor:
    """The ``(out // block_size, in // block_size)`` block mask of a block-structured mask.

    Args:
        mask: bool, either the weight's shape ``(out, in)`` (constant on every tile) or the
            block grid's shape already.
        block_size: edge of the square tiles.
        what: the caller, for messages.

    Returns:
        A bool block mask (a new tensor on ``mask``'s device).

    Raises:
        TypeError: ``mask`` is not a bool tensor.
        ValueError: not 2-D, not divisible, or an element mask that mixes kept and pruned
            weights inside one tile.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what}: mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{what}: mask must be a bool tensor (True = kept), got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"{what}: mask must be 2-D, got shape {tuple(mask.shape)}")
    out_features, in_features = mask.shape
    check_block_shape(out_features, in_features, block_size, what)
    grid = (out_features // block_size, in_features // block_size)
    tiles = mask.reshape(grid[0], block_size, grid[1], block_size)
    kept = tiles.any(dim=3).any(dim=1)
    whole = tiles.all(dim=3).all(dim=1)
    if not torch.equal(kept, whole):
        rows, cols = torch.nonzero(kept & ~whole)[0].tolist()
        raise ValueError(
            f"{what}: the mask is not block-structured for block_size {block_size}: tile "
            f"({rows}, {cols}) (weights [{rows * block_size}:{(rows + 1) * block_size}, "
            f"{cols * block_size}:{(cols + 1) * block_size}]) keeps some weights and prunes "
            "others; build it with imc_prune.masks.masks_from_scores(..., granularity='block', "
            f"block_size={block_size})"
        )
    return kept.clone()


def expand_block_mask(block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """The element mask ``(out, in)`` of a block mask: each entry repeated over its tile."""
    return block_mask.repeat_interleave(block_size, dim=0).repeat_interleave(block_size, dim=1)


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Which ``block_size x block_size`` tiles of an ``(out_features, in_features)`` weight
    are kept, indexed for the products.

    All index tensors are int32 on the device of the block mask.

    Attributes:
        block_size: edge of the tiles.
        out_features: rows of the weight.
        in_features: columns of the weight.
        block_mask: ``(n_block_rows, n_block_cols)`` bool, True = kept.
        rows: ``(n_kept,)`` block-row of each kept tile, row-major order.
        cols: ``(n_kept,)`` block-column of each kept tile, row-major order.
        row_offsets: ``(n_block_rows + 1,)`` CSR offsets: block-row ``i`` owns kept tiles
            ``row_offsets[i]:row_offsets[i + 1]`` of ``rows``/``cols``.
        t_rows: ``(n_kept,)`` block-row of each kept tile, column-major order.
        col_offsets: ``(n_block_cols + 1,)`` CSC offsets into ``t_rows``.
        n_kept: number of kept tiles (a Python int: no device sync to read it).
        row_bounds: ``row_offsets`` as Python ints, for the twin's loop (no sync per call).
        col_bounds: ``col_offsets`` as Python ints.
    """

    block_size: int
    out_features: int
    in_features: int
    block_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    row_offsets: torch.Tensor
    t_rows: torch.Tensor
    col_offsets: torch.Tensor
    n_kept: int
    row_bounds: tuple[int, ...]
    col_bounds: tuple[int, ...]

    @property
    def grid(self) -> tuple[int, int]:
        """``(n_block_rows, n_block_cols)``."""
        return self.out_features // self.block_size, self.in_features // self.block_size

    @property
    def density(self) -> float:
        """Fraction of tiles (and so of weights) kept."""
        total = self.grid[0] * self.grid[1]
        return self.n_kept / total if total else 1.0

    @property
    def device(self) -> torch.device:
        return self.block_mask.device

    def to(self, device: torch.device | str) -> BlockLayout:
        """The same layout with its tensors on ``device``."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = {
            field.name: getattr(self, field.name).to(device)
            for field in dataclasses.fields(self)
            if isinstance(getattr(self, field.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def block_layout(block_mask: torch.Tensor, block_size: int) -> BlockLayout:
    """Index a block mask for the block-sparse products.

    Args:
        block_mask: ``(n_block_rows, n_block_cols)`` bool, True = kept tile.
        block_size: edge of the tiles; the weight is
            ``(n_block_rows * block_size, n_block_cols * block_size)``.

    Returns:
        The :class:`BlockLayout`, on the block mask's device.

    Raises:
        TypeError: a non-bool block mask or a non-int block size.
        ValueError: a block mask that is not 2-D, or ``block_size < 1``.

    Example:
        >>> layout = block_layout(torch.tensor([[True, False], [True, True]]), 16)
        >>> layout.cols.tolist(), layout.row_offsets.tolist(), layout.t_rows.tolist()
        ([0, 0, 1], [0, 1, 3], [0, 1, 1])
    """
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise TypeError("block_layout: block_mask must be a bool tensor (True = kept tile)")
    if block_mask.dim() != 2:
        raise ValueError(
            f"block_layout: block_mask must be 2-D (block rows, block cols), got shape "
            f"{tuple(block_mask.shape)}"
        )
    n_rows, n_cols = block_mask.shape
    check_block_shape(n_rows * block_size, n_cols * block_size, block_size, "block_layout")
    block_mask = block_mask.detach()
    # nonzero lists indices in row-major order; on the transpose, in column-major order.
    rows, cols = torch.nonzero(block_mask, as_tuple=True)
    t_cols, t_rows = torch.nonzero(block_mask.t(), as_tuple=True)
    del t_cols
    zero = torch.zeros(1, dtype=torch.int64, device=block_mask.device)
    row_offsets = torch.cat([zero, block_mask.sum(dim=1).cumsum(0)])
    col_offsets = torch.cat([zero, block_mask.sum(dim=0).cumsum(0)])
    index = dict(dtype=torch.int32)
    return BlockLayout(
        block_size=block_size,
        out_features=n_rows * block_size,
        in_features=n_cols * block_size,
        block_mask=block_mask.clone(),
        rows=rows.to(**index),
        cols=cols.to(**index),
        row_offsets=row_offsets.to(**index),
        t_rows=t_rows.to(**index),
        col_offsets=col_offsets.to(**index),
        n_kept=int(rows.numel()),
        row_bounds=tuple(row_offsets.tolist()),
        col_bounds=tuple(col_offsets.tolist()),
    )


def _check_matrix(name: str, tensor: object, columns: int, like: torch.Tensor | None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() != 2 or tensor.shape[1] != columns:
        raise ValueError(f"{name} must have shape (M, {columns}), got {tuple(tensor.shape)}")
    if like is not None:
        if tensor.dtype != like.dtype:
            raise TypeError(f"{name} is {tensor.dtype} but the weight is {like.dtype}")
        if tensor.device != like.device:
            raise ValueError(f"{name} is on {tensor.device} but the weight on {like.device}")


def _check_weight(weight: object, layout: BlockLayout) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point tensor")
    expected = (layout.out_features, layout.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but the layout is for {expected} "
            f"(block_size {layout.block_size})"
        )
    if layout.device != weight.device:
        raise ValueError(
            f"the layout is on {layout.device} but the weight on {weight.device}; use "
            "layout.to(weight.device)"
        )


def _check_out(out: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out must be a {like.dtype} tensor of shape {shape} on {like.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def check_forward_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout: BlockLayout,
    out: torch.Tensor | None = None,
) -> None:
    """Validate the inputs of :func:`block_sparse_forward`.

    Raises:
        TypeError: non-float tensors, mismatched dtypes, a layout that is not a BlockLayout.
        ValueError: wrong shapes or devices, a non-contiguous ``out``.
    """
    _check_weight(weight, layout)
    _check_matrix("x", x, layout.in_features, weight)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (layout.out_features,):
            raise ValueError(
                f"bias must have shape ({layout.out_features},), got {tuple(bias.shape)}"
            )
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError("bias must have the weight's dtype and device")
    _check_out(out, (x.shape[0], layout.out_features), weight)


def check_grad_input_inputs(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    layout: BlockLayout,
    out: torch.Tensor | None = None,
) -> None:
    """Validate the inputs of :func:`block_sparse_grad_input` (raises as the forward's)."""
    _check_weight(weight, layout)
    _check_matrix("grad_output", grad_output, layout.out_features, weight)
    _check_out(out, (grad_output.shape[0], layout.in_features), weight)


def check_grad_weight_inputs(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    layout: BlockLayout,
    out: torch.Tensor | None = None,
) -> None:
    """Validate the inputs of :func:`block_sparse_grad_weight` (raises as the forward's)."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    _check_matrix("grad_output", grad_output, layout.out_features, None)
    _check_matrix("x", x, layout.in_features, grad_output)
    if x.shape[0] != grad_output.shape[0]:
        raise ValueError(
            f"x has {x.shape[0]} rows but grad_output has {grad_output.shape[0]}; they come "
            "from the same batch"
        )
    if layout.device != x.device:
        raise ValueError(f"the layout is on {layout.device} but x on {x.device}")
    _check_out(out, (layout.out_features, layout.in_features), x)


def triton_unsupported_reason(layout: BlockLayout, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot run this layout and dtype (beyond the device); None if
    they can."""
    if layout.block_size not in TRITON_BLOCK_SIZES:
        return (
            f"the Triton block-sparse kernels take block sizes {TRITON_BLOCK_SIZES}, got "
            f"{layout.block_size}"
        )
    if dtype not in TRITON_DTYPES:
        return f"the Triton block-sparse kernels take float32/float16/bfloat16, got {dtype}"
    return None


def _segments(bounds: tuple[int, ...]):
    """``(index, start, end)`` of each nonempty CSR/CSC segment."""
    return [
        (i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]
    ]


def _output(out: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device) if out is None else out


# The twin loops over block-rows (forward, weight gradient) or block-columns (input gradient),
# as the kernels' programs do, and runs one GEMM per segment on the gathered kept tiles: an
# (M, k * bs) x (k * bs, bs) product for a row with k kept tiles. Each GEMM has a long
# reduction and no partial product is written out and summed again, so on CPU this runs at
# dense-GEMM speed: forward of a 2048 x 2048 layer at 80 % block sparsity, block 64, 1024
# rows, one EPYC core: 21.6 ms, against 69 ms for one batched product of all (M, bs) x
# (bs, bs) tiles plus an index_add, and 82 ms for the masked-dense product. Gathers and
# scatters use index_select / index_copy_, 6x faster than advanced indexing on CPU here.


def block_sparse_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout: BlockLayout,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x (W * mask)^T + b`` from the kept tiles only.

    Args:
        x: ``(M, in_features)``.
        weight: ``(out_features, in_features)``; pruned tiles are never read.
        bias: ``(out_features,)`` or None.
        layout: the kept tiles.
        out: optional contiguous ``(M, out_features)`` buffer for ``y``.

    Returns:
        ``y``, ``(M, out_features)``; output block-rows without a kept tile hold the bias.

    Raises:
        TypeError, ValueError: see :func:`check_forward_inputs`.

    Example:
        >>> layout = block_layout(torch.tensor([[True, False]]), 2)
        >>> block_sparse_forward(torch.ones(1, 4), torch.ones(2, 4), None, layout)
        tensor([[2., 2.]])
    """
    check_forward_inputs(x, weight, bias, layout, out)
    m, bs = x.shape[0], layout.block_size
    n_rows, n_cols = layout.grid
    y = _output(out, (m, layout.out_features), weight)
    if bias is None:
        y.zero_()
    else:
        y.copy_(bias.expand_as(y))
    if layout.n_kept == 0 or m == 0:
        return y
    x_tiles = x.reshape(m, n_cols, bs)
    w_tiles = weight.reshape(n_rows, bs, n_cols, bs)
    cols = layout.cols.long()
    for row, start, end in _segments(layout.row_bounds):
        kept = cols[start:end]
        x_kept = x_tiles.index_select(1, kept).reshape(m, -1)  # (M, k * bs)
        w_kept = w_tiles[row].index_select(1, kept).reshape(bs, -1)  # (bs, k * bs)
        y[:, row * bs : (row + 1) * bs] += x_kept @ w_kept.t()
    return y


def block_sparse_grad_input(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    layout: BlockLayout,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dx = dy (W * mask)`` from the kept tiles only.

    Args:
        grad_output: ``dy``, ``(M, out_features)``.
        weight: ``(out_features, in_features)``; pruned tiles are never read.
        layout: the kept tiles.
        out: optional contiguous ``(M, in_features)`` buffer.

    Returns:
        ``dx``, ``(M, in_features)``; input block-columns without a kept tile are 0.

    Raises:
        TypeError, ValueError: see :func:`check_grad_input_inputs`.
    """
    check_grad_input_inputs(grad_output, weight, layout, out)
    m, bs = grad_output.shape[0], layout.block_size
    n_rows, n_cols = layout.grid
    dx = _output(out, (m, layout.in_features), weight)
    dx.zero_()
    if layout.n_kept == 0 or m == 0:
        return dx
    dy_tiles = grad_output.reshape(m, n_rows, bs)
    w_tiles = weight.reshape(n_rows, bs, n_cols, bs)
    t_rows = layout.t_rows.long()
    for col, start, end in _segments(layout.col_bounds):
        kept = t_rows[start:end]
        dy_kept = dy_tiles.index_select(1, kept).reshape(m, -1)  # (M, k * bs)
        w_kept = w_tiles[:, :, col].index_select(0, kept).reshape(-1, bs)  # (k * bs, bs)
        dx[:, col * bs : (col + 1) * bs] = dy_kept @ w_kept
    return dx


def block_sparse_grad_weight(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    layout: BlockLayout,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dW = (dy^T x) * mask``, computed on the kept tiles only, returned dense.

    Args:
        grad_output: ``dy``, ``(M, out_features)``.
        x: the forward's input, ``(M, in_features)``.
        layout: the kept tiles.
        out: optional contiguous ``(out_features, in_features)`` buffer.

    Returns:
        ``dW``, ``(out_features, in_features)`` with exact zeros on pruned tiles.

    Raises:
        TypeError, ValueError: see :func:`check_grad_weight_inputs`.
    """
    check_grad_weight_inputs(grad_output, x, layout, out)
    m, bs = x.shape[0], layout.block_size
    n_rows, n_cols = layout.grid
    dw = _output(out, (layout.out_features, layout.in_features), x)
    dw.zero_()
    if layout.n_kept == 0 or m == 0:
        return dw
    dy_tiles = grad_output.reshape(m, n_rows, bs)
    x_tiles = x.reshape(m, n_cols, bs)
    dw_tiles = dw.view(n_rows, bs, n_cols, bs)
    cols = layout.cols.long()
    for row, start, end in _segments(layout.row_bounds):
        kept = cols[start:end]
        x_kept = x_tiles.index_select(1, kept).reshape(m, -1)  # (M, k * bs)
        # index_copy_ on the tile view writes into dw's own storage.
        dw_tiles[row].index_copy_(1, kept, (dy_tiles[:, row].t() @ x_kept).view(bs, -1, bs))
    return dw
