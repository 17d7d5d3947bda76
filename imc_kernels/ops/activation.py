"""Fused elementwise activation kernels for block HVPs (Triton).

Two passes of the R-op through ``a = act(z)`` (kernel_design.md 2.2, kernels 1 and 2):

* ``activation_jvp``: ``a = act(z)`` and ``ra[i] = act'(z) * tangents[i]`` for ``i < b``;
* ``activation_hvp_backward``: ``g_z = act'(z) * grad`` and
  ``rg_z[i] = act'(z) * grad_tangents[i] + act''(z) * tangents[i] * grad``
  (the ``act''`` term is dropped for the GGN).

Each program reads its block of ``z`` (and ``grad``) once, keeps ``act'``/``act''`` in
registers and streams the ``b`` tangents through them: one read of the primal operands
instead of one per tangent. The formulas match the twin ``imc_kernels/reference/activation.py``
(derivative table there); only the way they are evaluated differs, for accuracy in the tails.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from imc_kernels.reference.activation import ACTIVATIONS, CURVATURES

# One code per activation: the kind is a constexpr, so each compiles to its own kernel with
# no runtime branch.
_KIND_CODES = {kind: code for code, kind in enumerate(ACTIVATIONS)}
_RELU = tl.constexpr(_KIND_CODES["relu"])
_LEAKY_RELU = tl.constexpr(_KIND_CODES["leaky_relu"])
_TANH = tl.constexpr(_KIND_CODES["tanh"])
_SIGMOID = tl.constexpr(_KIND_CODES["sigmoid"])
_GELU = tl.constexpr(_KIND_CODES["gelu"])
_GELU_TANH = tl.constexpr(_KIND_CODES["gelu_tanh"])
_SILU = tl.constexpr(_KIND_CODES["silu"])
_ZERO_SECOND_DERIVATIVE = ("relu", "leaky_relu")

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_TANH_K = tl.constexpr(0.044715)

# 1024 elements and 4 warps: 8 fp32 values per thread per operand, the usual sweet spot of a
# bandwidth-bound elementwise kernel (Liger's elementwise ops use the same order of size).
_BLOCK_SIZE = 1024
_NUM_WARPS = 4


@triton.jit
def _sigmoid_pair(x):
    # (sigmoid(x), 1 - sigmoid(x)) with exp of a non-positive argument only: no overflow, and
    # 1 - s is formed directly instead of by a cancelling subtraction.
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    small = e * inv
    positive = x >= 0.0
    return tl.where(positive, inv, small), tl.where(positive, small, inv)


@triton.jit
def _activation_terms(z, slope, KIND: tl.constexpr, TANH_SERIES_MAX: tl.constexpr):
    # (act(z), act'(z), act''(z)). Unused results cost nothing on GPU (dead code is removed
    # after the constexpr specialisation).
    zero = tl.zeros_like(z)
    if KIND == _RELU:
        # z <= 0 rather than z > 0 so that a NaN input stays NaN, as torch.relu does.
        a = tl.where(z <= 0.0, zero, z)
        d1 = tl.where(z > 0.0, zero + 1.0, zero)
        d2 = zero
    elif KIND == _LEAKY_RELU:
        a = tl.where(z > 0.0, z, z * slope)
        d1 = tl.where(z > 0.0, zero + 1.0, zero + slope)
        d2 = zero
    elif KIND == _TANH:
        # libdevice tanh is not available in the interpreter; tanh(z) = 2 sigmoid(2z) - 1,
        # whose sigmoid pair also gives sech^2 = 4 s (1 - s) without the cancellation of
        # 1 - t^2 for large |z|. Near 0, 2s - 1 cancels: an odd Taylor series (to z^11)
        # keeps the relative error of tanh at a few ulp there. Truncation at the threshold:
        # 3.6e-3 |z|^12, 2e-9 at 0.3 (fp32), 2.5e-16 at 0.08 (fp64).
        s, s_c = _sigmoid_pair(2.0 * z)
        z2 = z * z
        series = z2 * (-1382.0 / 155925.0 + z2 * (21844.0 / 6081075.0))
        series = z2 * (-17.0 / 315.0 + z2 * (62.0 / 2835.0 + series))
        series = z * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + series)))
        a = tl.where(tl.abs(z) < TANH_SERIES_MAX, series, s - s_c)
        d1 = 4.0 * s * s_c
        d2 = -2.0 * a * d1
    elif KIND == _SIGMOID:
        a, s_c = _sigmoid_pair(z)
        d1 = a * s_c
        d2 = d1 * (s_c - a)
    elif KIND == _GELU:
        phi = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT_2))
        a = z * cdf
        d1 = cdf + z * phi
        d2 = phi * (2.0 - z * z)
    elif KIND == _GELU_TANH:
        # 0.5 (1 + tanh u) = sigmoid(2u): the primal and act' need no tanh, and stay accurate
        # in the negative tail where 1 + tanh u cancels.
        z2 = z * z
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_K * z2 * z)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_K * z2)
        ddu = _SQRT_2_OVER_PI * 6.0 * _GELU_TANH_K * z
        s, s_c = _sigmoid_pair(2.0 * u)
        sech2 = 4.0 * s * s_c
        a = z * s
        d1 = s + 0.5 * z * sech2 * du
        d2 = sech2 * (du + 0.5 * z * (ddu - 2.0 * (s - s_c) * du * du))
    else:
        tl.static_assert(KIND == _SILU, "unknown activation code")
        s, s_c = _sigmoid_pair(z)
        a = z * s
        d1 = s * (1.0 + z * s_c)
        d2 = s * s_c * (2.0 + z * (s_c - s))
    return a, d1, d2


@triton.jit
def _activation_jvp_kernel(
    z_ptr,
    tangents_ptr,
    primal_ptr,
    out_tangents_ptr,
    n_elements,
    n_tangents,
    slope_hi,
    slope_lo,
    KIND: tl.constexpr,
    WRITE_PRIMAL: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    TANH_SERIES_MAX: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # int64 offsets: b * n_elements passes 2^31 long before one tensor does.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    # fp16/bf16 inputs are upcast on load; all arithmetic is fp32 (fp64 for fp64 inputs).
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    # Scalar arguments arrive as fp32; the slope is split hi + lo so fp64 runs get it exactly.
    slope = tl.cast(slope_hi, COMPUTE_DTYPE) + tl.cast(slope_lo, COMPUTE_DTYPE)
    a, d1, d2 = _activation_terms(z, slope, KIND, TANH_SERIES_MAX)
    if WRITE_PRIMAL:
        tl.store(primal_ptr + offsets, a.to(primal_ptr.dtype.element_ty), mask=mask)
    # Pointers advance by n_elements per tangent, so the loop index never multiplies a size.
    # A while loop, not `for _ in range(n_tangents)`: the Triton 3.6 interpreter converts a
    # runtime range bound with int() of a 1-element array, which numpy >= 2.3 rejects.
    tangent_ptrs = tangents_ptr + offsets
    out_ptrs = out_tangents_ptr + offsets
    i = 0
    while i < n_tangents:
        u = tl.load(tangent_ptrs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        tl.store(out_ptrs, (u * d1).to(out_tangents_ptr.dtype.element_ty), mask=mask)
        tangent_ptrs += n_elements
        out_ptrs += n_elements
        i += 1


@triton.jit
def _activation_hvp_backward_kernel(
    z_ptr,
    tangents_ptr,
    grad_ptr,
    grad_tangents_ptr,
    primal_ptr,
    out_tangents_ptr,
    n_elements,
    n_tangents,
    slope_hi,
    slope_lo,
    KIND: tl.constexpr,
    HAS_SECOND: tl.constexpr,
    WRITE_PRIMAL: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    TANH_SERIES_MAX: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    slope = tl.cast(slope_hi, COMPUTE_DTYPE) + tl.cast(slope_lo, COMPUTE_DTYPE)
    _, d1, d2 = _activation_terms(z, slope, KIND, TANH_SERIES_MAX)
    if WRITE_PRIMAL:
        tl.store(primal_ptr + offsets, (grad * d1).to(primal_ptr.dtype.element_ty), mask=mask)
    # act''(z) * grad is shared by the whole block; the twin groups the product the same way.
    d2_grad = d2 * grad
    grad_tangent_ptrs = grad_tangents_ptr + offsets
    tangent_ptrs = tangents_ptr + offsets
    out_ptrs = out_tangents_ptr + offsets
    i = 0
    while i < n_tangents:
        rg = tl.load(grad_tangent_ptrs, mask=mask, other=0.0).to(COMPUTE_DTYPE) * d1
        if HAS_SECOND:
            u = tl.load(tangent_ptrs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            rg = rg + u * d2_grad
        tl.store(out_ptrs, rg.to(out_tangents_ptr.dtype.element_ty), mask=mask)
        grad_tangent_ptrs += n_elements
        tangent_ptrs += n_elements
        out_ptrs += n_elements
        i += 1


def _split_float(value: float) -> tuple[float, float]:
    """``value = hi + lo`` with both parts exact in fp32 (Triton passes float scalars as fp32)."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, struct.unpack("f", struct.pack("f", value - hi))[0]


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    # fp16/bf16 are storage formats here: act'' of GELU or SiLU in half precision would lose
    # most of its digits to the products it is formed from.
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tanh_series_max(dtype: torch.dtype) -> float:
    # Where the Taylor series of tanh hands over to 2 sigmoid(2z) - 1: the point where the
    # series' truncation error meets the cancellation error of the sigmoid form, per precision.
    return 0.08 if dtype == torch.float64 else 0.3


def _output(
    out: torch.Tensor | None, shape: torch.Size, like: torch.Tensor, name: str
) -> torch.Tensor:
    """``out`` after checking it can take the result, or a fresh contiguous tensor."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != like.dtype or out.device != like.device:
        raise TypeError(
            f"{name} ({out.dtype}, {out.device}) must match the inputs ({like.dtype}, "
            f"{like.device})"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def _check_kind(kind: str) -> None:
    if kind not in _KIND_CODES:
        raise ValueError(f"unknown activation {kind!r}; expected one of {ACTIVATIONS}")


def activation_jvp(
    z: torch.Tensor,
    tangents: torch.Tensor,
    kind: str,
    *,
    negative_slope: float = 0.01,
    write_primal: bool = True,
    out_primal: torch.Tensor | None = None,
    out_tangents: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Triton launcher of :func:`imc_kernels.ops.activation_jvp` (inputs checked there).

    Args:
        z: pre-activation, any shape ``S``.
        tangents: ``(b, *S)``, ``b`` may be 0.
        kind: one of :data:`imc_kernels.reference.activation.ACTIVATIONS`.
        negative_slope: LeakyReLU slope.
        write_primal: also compute ``a = act(z)``; else the first output is None.
        out_primal: optional contiguous ``S`` buffer for ``a``.
        out_tangents: optional contiguous ``(b, *S)`` buffer for ``ra``.

    Returns:
        ``(a or None, ra)``.
    """
    _check_kind(kind)
    if out_primal is not None and not write_primal:
        raise ValueError("out_primal was given but write_primal=False")
    z = z.contiguous()
    tangents = tangents.contiguous()
    primal = _output(out_primal, z.shape, z, "out_primal") if write_primal else None
    out = _output(out_tangents, tangents.shape, z, "out_tangents")
    n_elements = z.numel()
    n_tangents = tangents.shape[0]
    if n_elements == 0 or (n_tangents == 0 and not write_primal):
        return primal, out
    slope_hi, slope_lo = _split_float(float(negative_slope))
    grid = (triton.cdiv(n_elements, _BLOCK_SIZE),)
    # Without WRITE_PRIMAL the primal pointer is never dereferenced; any tensor will do.
    _activation_jvp_kernel[grid](
        z,
        tangents,
        primal if write_primal else out,
        out,
        n_elements,
        n_tangents,
        slope_hi,
        slope_lo,
        KIND=_KIND_CODES[kind],
        WRITE_PRIMAL=write_primal,
        COMPUTE_DTYPE=_compute_dtype(z.dtype),
        TANH_SERIES_MAX=_tanh_series_max(z.dtype),
        BLOCK_SIZE=_BLOCK_SIZE,
        num_warps=_NUM_WARPS,
    )
    return primal, out


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
    out_primal: torch.Tensor | None = None,
    out_tangents: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Triton launcher of :func:`imc_kernels.ops.activation_hvp_backward` (inputs checked there).

    Args:
        z: pre-activation, shape ``S``.
        tangents: ``(b, *S)`` forward tangents of ``z``; unused (may be None) for the GGN and
            for ReLU/LeakyReLU, whose second derivative is zero.
        grad: ``S``, gradient with respect to the activation output.
        grad_tangents: ``(b, *S)`` tangents of ``grad``.
        kind: one of :data:`imc_kernels.reference.activation.ACTIVATIONS`.
        negative_slope: LeakyReLU slope.
        curvature: ``"hessian"`` or ``"ggn"``.
        write_primal: also compute ``g_z``; else the first output is None.
        out_primal: optional contiguous ``S`` buffer for ``g_z``.
        out_tangents: optional contiguous ``(b, *S)`` buffer for ``rg_z``.

    Returns:
        ``(g_z or None, rg_z)``.
    """
    _check_kind(kind)
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; expected one of {CURVATURES}")
    if out_primal is not None and not write_primal:
        raise ValueError("out_primal was given but write_primal=False")
    has_second = curvature == "hessian" and kind not in _ZERO_SECOND_DERIVATIVE
    if has_second and tangents is None:
        raise ValueError("curvature='hessian' needs the forward tangents of z")
    z = z.contiguous()
    grad = grad.contiguous()
    grad_tangents = grad_tangents.contiguous()
    # The kernel never reads the tangents without HAS_SECOND; any valid pointer will do.
    tangents = tangents.contiguous() if has_second else grad_tangents
    primal = _output(out_primal, z.shape, z, "out_primal") if write_primal else None
    out = _output(out_tangents, grad_tangents.shape, z, "out_tangents")
    n_elements = z.numel()
    n_tangents = grad_tangents.shape[0]
    if n_elements == 0 or (n_tangents == 0 and not write_primal):
        return primal, out
    slope_hi, slope_lo = _split_float(float(negative_slope))
    grid = (triton.cdiv(n_elements, _BLOCK_SIZE),)
    _activation_hvp_backward_kernel[grid](
        z,
        tangents,
        grad,
        grad_tangents,
        primal if write_primal else out,
        out,
        n_elements,
        n_tangents,
        slope_hi,
        slope_lo,
        KIND=_KIND_CODES[kind],
        HAS_SECOND=has_second,
        WRITE_PRIMAL=write_primal,
        COMPUTE_DTYPE=_compute_dtype(z.dtype),
        TANH_SERIES_MAX=_tanh_series_max(z.dtype),
        BLOCK_SIZE=_BLOCK_SIZE,
        num_warps=_NUM_WARPS,
    )
    return primal, out
