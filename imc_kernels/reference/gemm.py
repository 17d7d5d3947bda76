"""Pure-PyTorch twin of the ``imc_kernels::gemm_out`` C++ op (``csrc/gemm/``).

``out = a @ b + beta * out`` through ``torch.mm`` / ``Tensor.addmm_``: the path of every
device and dtype the compiled op does not take (CUDA tensors go to cuBLAS this way), and the
oracle of its tests. The compiled op differs only in which float32 GEMM library runs on the CPU.
"""

from __future__ import annotations

import math

import torch


def check_inputs(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, beta: float = 0.0
) -> None:
    """Validate the inputs of :func:`imc_kernels.ops.gemm`.

    Raises:
        ValueError: operands that are not 2-D, shapes that do not chain, an ``out`` of the wrong
            shape or sharing memory with an operand, a non-finite ``beta``, or ``beta != 0``
            without ``out``.
        TypeError: non-tensors, non-floating or mismatched dtypes, mismatched devices.
    """
    for name, t in (("a", a), ("b", b), ("out", out)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"gemm: {name} must be a tensor, got {type(t).__name__}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"gemm needs 2-D a and b, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm: shapes do not chain, a {tuple(a.shape)} @ b {tuple(b.shape)}")
    if not a.is_floating_point() or a.dtype != b.dtype:
        raise TypeError(f"gemm needs a and b of one floating dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise TypeError(f"gemm needs a and b on one device, got {a.device} and {b.device}")
    if not math.isfinite(beta):
        raise ValueError(f"gemm needs a finite beta, got {beta}")
    if out is None:
        if beta != 0.0:
            raise ValueError(f"gemm: beta = {beta} accumulates into out, but no out was given")
        return
    if out.shape != (a.shape[0], b.shape[1]):
        raise ValueError(
            f"gemm: out must have shape {(a.shape[0], b.shape[1])} for a {tuple(a.shape)} @ "
            f"b {tuple(b.shape)}, got {tuple(out.shape)}"
        )
    if out.dtype != a.dtype or out.device != a.device:
        raise TypeError(
            f"gemm: out ({out.dtype}, {out.device}) must match a ({a.dtype}, {a.device})"
        )
    for name, t in (("a", a), ("b", b)):
        if _may_share_memory(out, t):
            raise ValueError(f"gemm: out shares memory with {name}; pass a separate buffer")


def _may_share_memory(x: torch.Tensor, y: torch.Tensor) -> bool:
    """True when dense ``x`` and ``y`` share an element (their address ranges intersect).

    As torch's out= GEMMs do, strided views whose overlap is hard to decide (columns 0:4 and
    4:8 of one matrix) are let through: torch's GEMM then runs them.
    """
    if x.numel() == 0 or y.numel() == 0 or not (_dense(x) and _dense(y)):
        return False
    if x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (x_begin, x_end), (y_begin, y_end) = span(x), span(y)
    return x_begin < y_end and y_begin < x_end


def _dense(t: torch.Tensor) -> bool:
    """Row-major or column-major without gaps: its address range holds only its elements."""
    return t.is_contiguous() or t.T.is_contiguous()


def gemm(
    a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None, beta: float = 0.0
) -> torch.Tensor:
    """Reference of :func:`imc_kernels.ops.gemm`: returns ``out`` (a new tensor when None)."""
    if out is None:
        return torch.mm(a, b)
    if beta == 0.0:
        return torch.mm(a, b, out=out)
    return out.addmm_(a, b, beta=beta)
