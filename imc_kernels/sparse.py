"""Structured-sparse linear layers: block-sparse (Triton) and 2:4 semi-structured.

Both layers compute exactly what :class:`imc_kernels.masked.MaskedLinear` computes,
``y = x (W * mask)^T + b`` with zero gradient on pruned weights, and keep the dense
``nn.Linear`` weight as their parameter (so ``imc_prune`` masks and the masked optimizers of
:mod:`imc_kernels.masked` work unchanged). What differs is how the product runs:

* :class:`BlockSparseLinear`: the mask is constant on ``block_size x block_size`` tiles. The
  ``"block_sparse"`` path runs forward, input gradient and weight gradient on kept tiles only
  (:func:`imc_kernels.ops.block_sparse_forward` and friends: Triton kernels on CUDA, the
  pure-PyTorch twin on CPU). The weight gradient comes back dense with exact zeros on pruned
  tiles.
* :class:`SemiStructuredLinear`: the mask keeps at most 2 of every 4 consecutive weights along
  ``in_features``. The ``"semi_structured"`` path compresses ``W * mask`` with
  ``torch.sparse.to_sparse_semi_structured`` each forward and runs the forward product on the
  2:4 sparse tensor cores (cuSPARSELt or CUTLASS, compute capability 8.0+, fp16/bf16/int8
  and, with CUTLASS, fp32). The backward products are dense (the transposed weight is not
  2:4 along its rows).

Each layer also has the ``"masked_dense"`` path (``F.linear(x, W * mask, b)``), and
``path="auto"`` picks the structured path only where ``benchmarks/sparse.py`` measured a gain.
:func:`block_sparse_path` and :func:`semi_structured_path` say which path runs and why; the
defaults below record the measurements they rest on.

Example:
    >>> dense = nn.Linear(64, 64)
    >>> block_mask = torch.tensor([[True, False], [False, True]])
    >>> layer = BlockSparseLinear.from_dense(dense, block_mask, block_size=32,
    ...                                      path="block_sparse")
    >>> layer(torch.randn(5, 64)).shape
    torch.Size([5, 64])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from imc_kernels import ops
from imc_kernels.masked import _adopt_dense, _check_dense
from imc_kernels.reference.block_sparse import (
    BlockLayout,
    block_layout,
    block_mask_from_mask,
    check_block_shape,
    expand_block_mask,
)

__all__ = [
    "AUTO_BLOCK_SPARSE",
    "AUTO_SEMI_STRUCTURED",
    "BlockSparseLinear",
    "SemiStructuredLinear",
    "block_sparse_linear",
    "block_sparse_path",
    "semi_structured_linear",
    "semi_structured_path",
    "semi_structured_unsupported_reason",
    "structured_model",
]

BLOCK_SPARSE_PATHS = ("auto", "block_sparse", "masked_dense")
SEMI_STRUCTURED_PATHS = ("auto", "semi_structured", "masked_dense")

#: Where ``path="auto"`` turns the block-sparse path on: device type -> ``(max_density,
#: min_block_size)``, the kept fraction at or below which, with tiles at least that large, the
#: block-sparse forward + backward beat masked-dense in ``benchmarks/sparse.py``; None where
#: it never did or was not measured.
#:
#: * cpu (the pure-PyTorch twin): at most 20 % of the tiles kept, tiles of at least 64.
#:   ``benchmarks/results/sparse-4096/`` (4096 x 4096 layer, 1024 rows, block 64, forward +
#:   backward against masked-dense, idle 2-core AMD EPYC): 2.86x, 5.25x and 9.22x at 80, 90
#:   and 95 % block sparsity with the default 2 threads, 3.39x, 6.41x and 10.7x on one thread
#:   (2048 x 2048 in ``cpu-amd-epyc-2c-sparse-1t.md``: 3.6x, 6.6x, 11.5x). Caveat, measured
#:   too: on 2 threads with other jobs loading both cores (``cpu-amd-epyc-2c-sparse.md``) the
#:   twin fell to 0.16-0.19x, each of its ~100 small GEMMs and gathers per step waiting
#:   milliseconds for the second OpenMP thread to be scheduled; on a loaded machine pass
#:   ``path="masked_dense"`` or run one thread.
#: * cuda (the Triton kernels): None until a GPU run of ``benchmarks/sparse.py`` measures it
#:   (kernel_design.md 4.3: on by default only at >= 2x at 90 %, block 64, 4096 x 4096).
AUTO_BLOCK_SPARSE: dict[str, tuple[float, int] | None] = {"cpu": (0.2, 64), "cuda": None}

#: GPU names (``torch.cuda.get_device_name``) on which ``path="auto"`` uses 2:4. Empty: no
#: run of ``benchmarks/sparse.py`` on a GPU yet; published numbers are 1.1-1.3x on A100
#: fp16 for large GEMMs and no gain on H100 through torch (kernel_design.md 4.2).
AUTO_SEMI_STRUCTURED: frozenset[str] = frozenset()


def _check_path(path: str, allowed: tuple[str, ...], owner: str) -> str:
    if path not in allowed:
        raise ValueError(f"{owner}: path must be one of {allowed}, got {path!r}")
    return path


# --- Block-sparse ----------------------------------------------------------------------------


class _BlockSparseLinearFunction(torch.autograd.Function):
    """``y = x (W * mask)^T + b`` with forward and both gradients on kept tiles only."""

    @staticmethod
    def forward(ctx, input, weight, bias, layout):
        x = input.reshape(-1, layout.in_features)
        y = ops.block_sparse_forward(x, weight, bias, layout)
        ctx.save_for_backward(x, weight)
        ctx.layout = layout
        ctx.has_bias = bias is not None
        ctx.input_shape = input.shape
        return y.view(*input.shape[:-1], layout.out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        layout = ctx.layout
        dy = grad_output.reshape(-1, layout.out_features)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = ops.block_sparse_grad_input(dy, weight, layout).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = ops.block_sparse_grad_weight(dy, x, layout)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = dy.sum(dim=0)
        return grad_input, grad_weight, grad_bias, None


def block_sparse_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout: BlockLayout,
) -> torch.Tensor:
    """``F.linear(input, weight * mask, bias)`` on the kept tiles of ``layout``, differentiable.

    Args:
        input: ``(*, in_features)``.
        weight: dense ``(out_features, in_features)``; pruned tiles are never read and get an
            exactly zero gradient.
        bias: ``(out_features,)`` or None.
        layout: :func:`imc_kernels.reference.block_sparse.block_layout` of the block mask, on
            the weight's device.

    Returns:
        ``(*, out_features)``.

    Raises:
        TypeError, ValueError: mismatched shapes, dtypes or devices (see
            :func:`imc_kernels.reference.block_sparse.check_forward_inputs`).

    Example:
        >>> layout = block_layout(torch.tensor([[True, False]]), 2)
        >>> block_sparse_linear(torch.ones(3, 4), torch.ones(2, 4), None, layout).shape
        torch.Size([3, 2])
    """
    if not isinstance(input, torch.Tensor) or input.dim() < 1:
        raise ValueError("block_sparse_linear: input must be a tensor with at least 1 dimension")
    return _BlockSparseLinearFunction.apply(input, weight, bias, layout)


def block_sparse_path(
    device: torch.device | str,
    density: float,
    block_size: int,
    requested: str = "auto",
) -> tuple[str, str]:
    """Which path a block-sparse layer runs, and why.

    Args:
        device: where the layer lives.
        density: fraction of tiles kept.
        block_size: edge of the tiles.
        requested: ``"auto"``, ``"block_sparse"`` or ``"masked_dense"``.

    Returns:
        ``(path, reason)`` with ``path`` ``"block_sparse"`` or ``"masked_dense"``.

    Raises:
        ValueError: an unknown ``requested`` path.

    Example:
        >>> block_sparse_path("cpu", 0.1, 64)[0]
        'masked_dense'
    """
    _check_path(requested, BLOCK_SPARSE_PATHS, "block_sparse_path")
    device = torch.device(device)
    if requested != "auto":
        return requested, f"path={requested!r} was requested"
    threshold = AUTO_BLOCK_SPARSE.get(device.type)
    if threshold is None:
        measured = "measured no robust gain" if device.type == "cpu" else "has no measurement"
        return "masked_dense", (
            f"block-sparse is off by default on {device.type}: benchmarks/sparse.py "
            f"{measured} there (AUTO_BLOCK_SPARSE); pass path='block_sparse' to force it"
        )
    max_density, min_block = threshold
    if density <= max_density and block_size >= min_block:
        return "block_sparse", (
            f"density {density:.3g} <= {max_density:g} with blocks of {block_size} >= "
            f"{min_block}: block-sparse beat masked-dense on {device.type} in "
            "benchmarks/sparse.py"
        )
    return "masked_dense", (
        f"block-sparse wins on {device.type} only at density <= {max_density:g} with blocks "
        f">= {min_block}; this layer has density {density:.3g}, blocks of {block_size}"
    )


class BlockSparseLinear(nn.Linear):
    """``nn.Linear`` with a block mask: ``y = x (W * mask)^T + b``, mask constant per tile.

    The bool buffer ``block_mask`` (``(out_features // block_size, in_features //
    block_size)``, True = kept tile) is saved in the state dict. Pruned weights do not affect
    the output and receive exactly zero gradient, whatever their value, on both paths.

    Args:
        in_features: as ``nn.Linear``; a multiple of ``block_size``.
        out_features: as ``nn.Linear``; a multiple of ``block_size``.
        bias: as ``nn.Linear``.
        device: as ``nn.Linear``.
        dtype: as ``nn.Linear``.
        block_size: edge of the square tiles (the Triton kernels take 16, 32 and 64;
            others run the twin).
        mask: a block mask, or an element mask of the weight's shape that is constant on
            every tile (``imc_prune`` masks with ``granularity="block"``); None keeps all.
        path: ``"auto"`` (see :func:`block_sparse_path`), ``"block_sparse"`` or
            ``"masked_dense"``.

    Raises:
        TypeError: a non-bool mask or a non-int block size.
        ValueError: dimensions not divisible by ``block_size``, a mask that is not
            block-structured or of the wrong shape, an unknown path.

    Example:
        >>> layer = BlockSparseLinear(64, 32, block_size=16, path="block_sparse")
        >>> layer.block_mask.shape
        torch.Size([2, 4])
    """

    block_mask: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        block_size: int,
        mask: torch.Tensor | None = None,
        path: str = "auto",
    ) -> None:
        owner = type(self).__name__
        check_block_shape(out_features, in_features, block_size, owner)
        _check_path(path, BLOCK_SPARSE_PATHS, owner)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.path = path
        self.block_size = block_size
        self._cache: tuple | None = None
        self.register_buffer("block_mask", self._block_mask(mask, self.weight.device))

    def _block_mask(self, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        owner = type(self).__name__
        grid = (self.out_features // self.block_size, self.in_features // self.block_size)
        if mask is None:
            return torch.ones(grid, dtype=torch.bool, device=device)
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == grid:
            if mask.dtype != torch.bool:
                raise TypeError(f"{owner}: mask must be a bool tensor, got {mask.dtype}")
            block_mask = mask.detach().clone()
        elif isinstance(mask, torch.Tensor) and tuple(mask.shape) == (
            self.out_features,
            self.in_features,
        ):
            block_mask = block_mask_from_mask(mask.detach(), self.block_size, owner)
        elif isinstance(mask, torch.Tensor):
            raise ValueError(
                f"{owner}: mask has shape {tuple(mask.shape)}; expected the block grid {grid} "
                f"or the weight's shape {(self.out_features, self.in_features)}"
            )
        else:
            raise TypeError(f"{owner}: mask must be a bool tensor or None, got {type(mask)}")
        return block_mask.to(device)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Replace the mask (block or element mask; None keeps all). Raises as the constructor."""
        self.block_mask = self._block_mask(mask, self.weight.device)
        self._cache = None

    def _layout_and_mask(self) -> tuple[BlockLayout, torch.Tensor]:
        # Rebuilt when the block mask moves (module.to) or is written (load_state_dict copies
        # into the buffer in place, which bumps its version counter).
        block_mask = self.block_mask
        key = (block_mask.device, block_mask.data_ptr(), block_mask._version)
        if self._cache is None or self._cache[0] != key:
            layout = block_layout(block_mask, self.block_size)
            self._cache = (key, layout, expand_block_mask(block_mask, self.block_size))
        return self._cache[1], self._cache[2]

    @property
    def layout(self) -> BlockLayout:
        """The :class:`BlockLayout` of the block mask (cached)."""
        return self._layout_and_mask()[0]

    @property
    def mask(self) -> torch.Tensor:
        """The element mask, the weight's shape (a cached tensor: do not modify it)."""
        return self._layout_and_mask()[1]

    @property
    def density(self) -> float:
        """Fraction of tiles (and weights) kept."""
        return self.layout.density

    def active_path(self) -> tuple[str, str]:
        """``(path, reason)``: which path the forward runs, and why; for ``"block_sparse"``
        the reason names the backend of the products (triton or reference)."""
        layout = self.layout
        path, reason = block_sparse_path(
            self.weight.device, layout.density, self.block_size, self.path
        )
        if path == "block_sparse":
            reason += f"; products on the {ops.block_sparse_backend(self.weight, layout)} backend"
        return path, reason

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        layout, mask = self._layout_and_mask()
        path, _ = block_sparse_path(self.weight.device, layout.density, self.block_size, self.path)
        if path == "block_sparse":
            return block_sparse_linear(input, self.weight, self.bias, layout)
        return F.linear(input, self.weight * mask, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, block_size={self.block_size}, "
            f"density={self.density:.3g}, path={self.path!r}"
        )

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        mask: torch.Tensor | None = None,
        *,
        block_size: int,
        path: str = "auto",
    ) -> BlockSparseLinear:
        """A block-sparse layer sharing ``linear``'s weight and bias parameters.

        Args:
            linear: the dense layer.
            mask: block mask or block-structured element mask; None keeps all.
            block_size: edge of the tiles.
            path: see the class.

        Returns:
            The layer (weight values unchanged).

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``; see the class.
            ValueError: see the class.

        Example:
            >>> dense = nn.Linear(32, 32)
            >>> BlockSparseLinear.from_dense(dense, block_size=16).weight is dense.weight
            True
        """
        _check_dense(cls, linear, nn.Linear)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            block_size=block_size,
            path=path,
        )
        return _adopt_dense(layer, linear, mask)


# --- 2:4 semi-structured ---------------------------------------------------------------------


def check_two_four_mask(mask: torch.Tensor, what: str) -> None:
    """Raise unless ``mask`` keeps at most 2 of every 4 consecutive weights along its rows.

    Raises:
        TypeError: not a bool tensor.
        ValueError: not 2-D, columns not a multiple of 4, or a group with 3 or 4 kept.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{what}: a 2:4 mask must be a bool tensor (True = kept)")
    if mask.dim() != 2 or mask.shape[1] % 4:
        raise ValueError(
            f"{what}: a 2:4 mask must be 2-D with a multiple of 4 columns, got shape "
            f"{tuple(mask.shape)}"
        )
    kept = mask.reshape(mask.shape[0], -1, 4).sum(dim=2)
    if bool((kept > 2).any()):
        row, group = torch.nonzero(kept > 2)[0].tolist()
        raise ValueError(
            f"{what}: the mask is not 2:4: row {row}, columns {4 * group}:{4 * group + 4} keep "
            f"{int(kept[row, group])} of 4; build it with imc_prune.masks.masks_from_scores(..., "
            "granularity='2:4')"
        )


def _semi_structured_class():
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    # The class to_sparse_semi_structured itself picks.
    if SparseSemiStructuredTensor._FORCE_CUTLASS:
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


def semi_structured_unsupported_reason(
    device: torch.device | str, dtype: torch.dtype, shape: tuple[int, int]
) -> str | None:
    """Why ``to_sparse_semi_structured`` cannot run a ``shape`` weight; None when it can.

    Args:
        device: the weight's device.
        dtype: the weight's dtype.
        shape: ``(out_features, in_features)``.

    Example:
        >>> semi_structured_unsupported_reason("cpu", torch.float16, (64, 64))[:40]
        'to_sparse_semi_structured needs a CUDA G'
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"to_sparse_semi_structured needs a CUDA GPU; the weight is on {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (
            f"2:4 sparse tensor cores need compute capability 8.0 or newer (A100, H100, ...); "
            f"this GPU is sm{major}{minor}"
        )
    cls = _semi_structured_class()
    if cls.BACKEND == "cusparselt" and not torch.backends.cusparselt.is_available():
        return (
            "this torch build has no cuSPARSELt (set torch.sparse.SparseSemiStructuredTensor."
            "_FORCE_CUTLASS = True to use the CUTLASS kernels)"
        )
    constraints = cls._DTYPE_SHAPE_CONSTRAINTS
    if dtype not in constraints:
        return (
            f"the {cls.BACKEND} 2:4 kernels take {', '.join(map(str, constraints))}; the "
            f"weight is {dtype}"
        )
    rows, cols = shape
    config = constraints[dtype]
    if rows % config.sparse_min_rows or cols % config.sparse_min_cols:
        return (
            f"the {cls.BACKEND} 2:4 kernels need a weight whose shape is a multiple of "
            f"({config.sparse_min_rows}, {config.sparse_min_cols}) for {dtype}; it is {shape}"
        )
    return None


def semi_structured_path(
    device: torch.device | str,
    dtype: torch.dtype,
    shape: tuple[int, int],
    requested: str = "auto",
) -> tuple[str, str]:
    """Which path a 2:4 layer runs, and why.

    Args:
        device: the weight's device.
        dtype: the weight's dtype.
        shape: ``(out_features, in_features)``.
        requested: ``"auto"``, ``"semi_structured"`` or ``"masked_dense"``.

    Returns:
        ``(path, reason)`` with ``path`` ``"semi_structured"`` or ``"masked_dense"``.

    Raises:
        ValueError: an unknown ``requested`` path.
        RuntimeError: ``"semi_structured"`` requested where it cannot run (with the reason).

    Example:
        >>> semi_structured_path("cpu", torch.float32, (64, 64))[0]
        'masked_dense'
    """
    _check_path(requested, SEMI_STRUCTURED_PATHS, "semi_structured_path")
    if requested == "masked_dense":
        return "masked_dense", "path='masked_dense' was requested"
    reason = semi_structured_unsupported_reason(device, dtype, shape)
    if requested == "semi_structured":
        if reason is not None:
            raise RuntimeError(f"path='semi_structured' cannot run: {reason}")
        return "semi_structured", "path='semi_structured' was requested"
    if reason is not None:
        return "masked_dense", f"2:4 is not available: {reason}"
    name = torch.cuda.get_device_name(torch.device(device))
    if name in AUTO_SEMI_STRUCTURED:
        return "semi_structured", f"2:4 beat masked-dense on {name} in benchmarks/sparse.py"
    return "masked_dense", (
        f"2:4 runs on {name} but is off by default: no benchmarks/sparse.py run on it showed a "
        "gain (AUTO_SEMI_STRUCTURED); pass path='semi_structured' to force it"
    )


class _SemiStructuredLinearFunction(torch.autograd.Function):
    """Forward on the 2:4 sparse tensor cores; dense backward with the masked weight."""

    @staticmethod
    def forward(ctx, input, weight, bias, mask):
        masked_weight = weight * mask
        x = input.reshape(-1, weight.shape[1])
        sparse_weight = torch.sparse.to_sparse_semi_structured(masked_weight)
        y = F.linear(x, sparse_weight, bias)
        ctx.save_for_backward(x, masked_weight, mask)
        ctx.has_bias = bias is not None
        ctx.input_shape = input.shape
        return y.view(*input.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, masked_weight, mask = ctx.saved_tensors
        dy = grad_output.reshape(-1, masked_weight.shape[0])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (dy @ masked_weight).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = (dy.t() @ x) * mask
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = dy.sum(dim=0)
        return grad_input, grad_weight, grad_bias, None


def semi_structured_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """``F.linear(input, weight * mask, bias)`` with the forward on 2:4 sparse tensor cores.

    Args:
        input: ``(*, in_features)``.
        weight: ``(out_features, in_features)`` on a GPU that
            :func:`semi_structured_unsupported_reason` accepts.
        bias: ``(out_features,)`` or None.
        mask: bool 2:4 mask of the weight's shape.

    Returns:
        ``(*, out_features)``.

    Raises:
        RuntimeError: 2:4 cannot run here (the reason is in the message).
        TypeError, ValueError: a mask that is not 2:4.
    """
    check_two_four_mask(mask, "semi_structured_linear")
    reason = semi_structured_unsupported_reason(weight.device, weight.dtype, tuple(weight.shape))
    if reason is not None:
        raise RuntimeError(f"semi_structured_linear cannot run: {reason}")
    return _SemiStructuredLinearFunction.apply(input, weight, bias, mask)


class SemiStructuredLinear(nn.Linear):
    """``nn.Linear`` with a 2:4 mask: ``y = x (W * mask)^T + b``.

    The bool buffer ``mask`` (the weight's shape, at most 2 kept in every 4 consecutive
    weights of a row) is saved in the state dict. Pruned weights do not affect the output and
    receive zero gradient on both paths.

    Args:
        in_features: as ``nn.Linear``; a multiple of 4.
        out_features: as ``nn.Linear``.
        bias: as ``nn.Linear``.
        device: as ``nn.Linear``.
        dtype: as ``nn.Linear``.
        mask: the 2:4 mask (required: a dense layer is not 2:4).
        path: ``"auto"`` (see :func:`semi_structured_path`), ``"semi_structured"`` or
            ``"masked_dense"``.

    Raises:
        TypeError, ValueError: a mask that is not 2:4 or of the wrong shape, an unknown path.

    Example:
        >>> mask = torch.tensor([[True, True, False, False]] * 2)
        >>> SemiStructuredLinear(4, 2, mask=mask)(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    mask: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        mask: torch.Tensor,
        path: str = "auto",
    ) -> None:
        _check_path(path, SEMI_STRUCTURED_PATHS, type(self).__name__)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.path = path
        self.register_buffer("mask", self._checked(mask, self.weight.device))

    def _checked(self, mask: torch.Tensor, device: torch.device) -> torch.Tensor:
        owner = type(self).__name__
        check_two_four_mask(mask, owner)
        if tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{owner}: mask has shape {tuple(mask.shape)} but the weight has shape "
                f"{(self.out_features, self.in_features)}"
            )
        return mask.detach().to(device=device, copy=True)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the 2:4 mask. Raises as the constructor."""
        self.mask = self._checked(mask, self.weight.device)

    def active_path(self) -> tuple[str, str]:
        """``(path, reason)``: which path the forward runs, and why."""
        weight = self.weight
        return semi_structured_path(weight.device, weight.dtype, tuple(weight.shape), self.path)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.active_path()[0] == "semi_structured":
            return _SemiStructuredLinearFunction.apply(input, self.weight, self.bias, self.mask)
        return F.linear(input, self.weight * self.mask, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, path={self.path!r}"

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, mask: torch.Tensor, *, path: str = "auto"
    ) -> SemiStructuredLinear:
        """A 2:4 layer sharing ``linear``'s weight and bias parameters.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``; see the class.
            ValueError: see the class.
        """
        _check_dense(cls, linear, nn.Linear)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            mask=mask,
            path=path,
        )
        return _adopt_dense(layer, linear, mask)


# --- Swapping layers into a model ------------------------------------------------------------


def structured_model(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    *,
    granularity: str,
    block_size: int | None = None,
    path: str = "auto",
) -> nn.Module:
    """Swap the masked ``nn.Linear`` layers of ``model`` for structured-sparse ones, in place.

    Parameter names stay the same and the new layers share the old parameters.

    Args:
        model: the network.
        masks: bool masks keyed by ``"<module>.weight"`` (``imc_prune`` masks made with
            ``granularity="block"`` or ``"2:4"``).
        granularity: ``"block"`` (:class:`BlockSparseLinear`) or ``"2:4"``
            (:class:`SemiStructuredLinear`).
        block_size: the tile edge, for ``"block"``.
        path: the layers' ``path``.

    Returns:
        ``model``, or the new layer when ``model`` itself is the masked linear layer.

    Raises:
        ValueError: a key that is not the weight of an ``nn.Linear`` of the model, an unknown
            granularity, a missing block size, or a mask the layer rejects.

    Example:
        >>> model = nn.Sequential(nn.Linear(32, 16), nn.ReLU())
        >>> mask = torch.zeros(16, 32, dtype=torch.bool)
        >>> mask[:, :16] = True
        >>> model = structured_model(model, {"0.weight": mask}, granularity="block",
        ...                          block_size=16)
        >>> type(model[0]).__name__, model[0].density
        ('BlockSparseLinear', 0.5)
    """
    if granularity not in ("block", "2:4"):
        raise ValueError(
            f"structured_model: granularity must be 'block' or '2:4', got {granularity!r}"
        )
    if granularity == "block" and block_size is None:
        raise ValueError("structured_model: granularity='block' needs a block_size")
    for key, mask in masks.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf != "weight":
            raise ValueError(f"structured_model: {key!r} is not a weight name ('<module>.weight')")
        try:
            module = model.get_submodule(prefix)
        except AttributeError as exc:
            raise ValueError(f"structured_model: {key!r} names no module of the model") from exc
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"structured_model: {key!r} belongs to a {type(module).__name__}; only "
                "nn.Linear layers have structured-sparse kernels"
            )
        if granularity == "block":
            layer = BlockSparseLinear.from_dense(module, mask, block_size=block_size, path=path)
        else:
            layer = SemiStructuredLinear.from_dense(module, mask, path=path)
        if not prefix:
            model = layer
            continue
        parent_name, _, child_name = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer)
    return model
