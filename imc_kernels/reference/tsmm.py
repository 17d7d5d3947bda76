"""Pure-PyTorch twin of the ``imc_kernels::tsmm_xty`` C++/CUDA op (``csrc/lanczos/``).

``x.T @ y`` for tall-skinny ``x`` (n, m) and ``y`` (n, b) with the products accumulated in
float64. The twin upcasts whole inputs (twice the bytes of a memory-bound pass, which the
compiled kernels avoid) and lets one fp64 GEMM do the sum.
"""

from __future__ import annotations

import torch

MAX_COLUMNS = 512


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    """Validate the inputs of :func:`tsmm_xty`.

    Raises:
        ValueError: not 2-D, different row counts, or more than 512 columns.
        TypeError: dtypes other than float32/float64, or mismatched dtype or device.
    """
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"tsmm_xty needs 2-D x and y, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}"
        )
    if x.shape[1] > MAX_COLUMNS or y.shape[1] > MAX_COLUMNS:
        raise ValueError(
            f"tsmm_xty supports at most {MAX_COLUMNS} columns, got {x.shape[1]} and {y.shape[1]}"
        )
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"tsmm_xty takes float32 or float64 inputs, got {x.dtype}")
    if x.dtype != y.dtype or x.device != y.device:
        raise TypeError(f"x ({x.dtype}, {x.device}) and y ({y.dtype}, {y.device}) must match")


def tsmm_xty(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`imc_kernels.ops.tsmm_xty`: ``(m, b)`` float64."""
    return x.to(torch.float64).T @ y.to(torch.float64)
