"""Dispatched kernel entry points.

Each function here picks a backend with :func:`imc_kernels._dispatch.select` and calls the
Triton launcher (``imc_kernels/ops/<family>.py``), the C++ extension, or the pure-PyTorch twin
(``imc_kernels/reference/<family>.py``). All implementations share one signature, so the twin
is the CPU path, the test oracle and the benchmark baseline at once.
"""

from __future__ import annotations

import torch

from imc_kernels import _dispatch
from imc_kernels.reference import activation as _ref_activation
from imc_kernels.reference import cross_entropy as _ref_cross_entropy
from imc_kernels.reference import tsmm as _ref_tsmm

ACTIVATIONS = _ref_activation.ACTIVATIONS


def activation_jvp(
    z: torch.Tensor,
    tangents: torch.Tensor,
    kind: str,
    *,
    negative_slope: float = 0.01,
    write_primal: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Activation forward for the primal and a block of tangents in one pass.

    ``a = act(z)`` and ``ra[i] = act'(z) * tangents[i]``.

    Args:
        z: pre-activation, any shape ``S``.
        tangents: ``(b, *S)`` tangents of ``z`` (``b`` may be 0).
        kind: one of :data:`ACTIVATIONS`.
        negative_slope: LeakyReLU slope.
        write_primal: also return ``a``; else the first output is None.

    Returns:
        ``(a or None, ra)`` with ``ra`` shaped like ``tangents``.
    """
    _ref_activation.check_inputs(z, tangents, kind)
    backend = _dispatch.select("activation", z.device, z.dtype, available=("triton", "reference"))
    if backend == "triton":
        from imc_kernels.ops import activation as _triton_activation

        return _triton_activation.activation_jvp(
            z, tangents, kind, negative_slope=negative_slope, write_primal=write_primal
        )
    return _ref_activation.activation_jvp(
        z, tangents, kind, negative_slope=negative_slope, write_primal=write_primal
    )


def activation_hvp_backward(
    z: torch.Tensor,
    tangents: torch.Tensor | None,
    grad: torch.Tensor,
    grad_tangents: torch.Tensor,
    kind: str,
    *,
    negative_slope: float = 0.01,
    curvature: str = "hessian",
    write_primal: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Activation backward for the primal gradient and a block of tangent gradients.

    ``g_z = act'(z) * grad`` and
    ``rg_z[i] = act'(z) * grad_tangents[i] + act''(z) * tangents[i] * grad``;
    the second-derivative term is dropped for ``curvature="ggn"``.

    Args:
        z: pre-activation, shape ``S``.
        tangents: ``(b, *S)`` forward tangents of ``z`` (unused, may be None, for GGN).
        grad: ``S``, the primal gradient with respect to the activation output.
        grad_tangents: ``(b, *S)``, the tangents of ``grad``.
        kind: one of :data:`ACTIVATIONS`.
        negative_slope: LeakyReLU slope.
        curvature: ``"hessian"`` or ``"ggn"``.
        write_primal: also return ``g_z``; else the first output is None.

    Returns:
        ``(g_z or None, rg_z)``.
    """
    _ref_activation.check_backward_inputs(z, tangents, grad, grad_tangents, kind, curvature)
    backend = _dispatch.select("activation", z.device, z.dtype, available=("triton", "reference"))
    if backend == "triton":
        from imc_kernels.ops import activation as _triton_activation

        return _triton_activation.activation_hvp_backward(
            z,
            tangents,
            grad,
            grad_tangents,
            kind,
            negative_slope=negative_slope,
            curvature=curvature,
            write_primal=write_primal,
        )
    return _ref_activation.activation_hvp_backward(
        z,
        tangents,
        grad,
        grad_tangents,
        kind,
        negative_slope=negative_slope,
        curvature=curvature,
        write_primal=write_primal,
    )


def cross_entropy_hvp(
    logits: torch.Tensor,
    target: torch.Tensor,
    tangents: torch.Tensor,
    *,
    scale: float,
    ignore_index: int = -100,
    write_primal: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Softmax cross-entropy: row losses, gradient and tangent gradients from one read.

    With ``p = softmax(logits)`` per row:
    ``grad = scale * (p - onehot(target))`` and
    ``rgrad[i] = scale * (p * u_i - p * (p . u_i))`` for ``u_i = tangents[i]``.
    Rows whose target equals ``ignore_index`` get zeros.

    Args:
        logits: ``(N, C)``.
        target: ``(N,)`` integer class indices.
        tangents: ``(b, N, C)`` tangents of the logits.
        scale: the loss reduction's weight per row (``1/N`` for a mean).
        ignore_index: target value that marks a row to ignore.
        write_primal: also return the row losses (unscaled, ``(N,)``) and ``grad``.

    Returns:
        ``(row_loss or None, grad or None, rgrad)``.
    """
    _ref_cross_entropy.check_inputs(logits, target, tangents, ignore_index)
    backend = _dispatch.select(
        "cross_entropy", logits.device, logits.dtype, available=("triton", "reference")
    )
    if backend == "triton":
        from imc_kernels.ops import cross_entropy as _triton_cross_entropy

        return _triton_cross_entropy.cross_entropy_hvp(
            logits,
            target,
            tangents,
            scale=scale,
            ignore_index=ignore_index,
            write_primal=write_primal,
        )
    return _ref_cross_entropy.cross_entropy_hvp(
        logits, target, tangents, scale=scale, ignore_index=ignore_index, write_primal=write_primal
    )


def tsmm_xty(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Tall-skinny ``x.T @ y`` with fp64 accumulation, deterministic.

    Args:
        x: ``(n, m)`` float32 (or float64), ``n`` large, ``m <= 512``.
        y: ``(n, b)`` same dtype and device, ``b <= 512``.

    Returns:
        ``(m, b)`` float64.
    """
    _ref_tsmm.check_inputs(x, y)
    backend = _dispatch.select("tsmm", x.device, x.dtype, available=("cext", "reference"))
    if backend == "cext":
        return torch.ops.imc_kernels.tsmm_xty(x, y)
    return _ref_tsmm.tsmm_xty(x, y)
