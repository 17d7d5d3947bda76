"""Pure-PyTorch twin of ``imc_kernels/ops/activation.py``.

The same functions are the CPU path of the fused HVP engine, the test oracle of the Triton
kernels and the baseline of the benchmarks. Derivative formulas, for the pre-activation ``z``:

=============  ==========================  ===========================================
kind           act'(z)                     act''(z)
=============  ==========================  ===========================================
relu           1[z > 0]                    0 (a.e.)
leaky_relu     1 if z > 0 else slope       0 (a.e.)
tanh           1 - t^2, t = tanh z         -2 t (1 - t^2)
sigmoid        s (1 - s)                   s (1 - s) (1 - 2 s)
gelu (erf)     Phi + z phi                 phi (2 - z^2)
gelu_tanh      0.5 (1 + t) + 0.5 z (1-t^2) u'   (1 - t^2) (u' + 0.5 z (u'' - 2 t u'^2))
silu           s (1 + z (1 - s))           s (1 - s) (2 + z (1 - 2 s))
=============  ==========================  ===========================================

with ``u = c (z + 0.044715 z^3)``, ``c = sqrt(2/pi)`` for the tanh approximation of GELU.

The formulas are evaluated without cancellation in the tails, as the Triton kernels do:
``1 - s`` is ``sigmoid(-z)``, ``1 - t^2`` is ``4 s(2z) s(-2z)`` and ``0.5 (1 + tanh u)`` is
``sigmoid(2u)``. In fp32 the textbook forms lose relative accuracy as ``|z|`` grows and round
to zero past ``|z|`` ~ 9 (``1 - t^2``) or ~ 17 (``1 - s``).
"""

from __future__ import annotations

import math

import torch

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu")
CURVATURES = ("hessian", "ggn")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_K = 0.044715


def check_inputs(z: torch.Tensor, tangents: torch.Tensor, kind: str) -> None:
    """Validate the inputs of :func:`activation_jvp`.

    Raises:
        ValueError: unknown ``kind`` or mismatched shapes.
        TypeError: mismatched dtype or device.
    """
    if kind not in ACTIVATIONS:
        raise ValueError(f"unknown activation {kind!r}; expected one of {ACTIVATIONS}")
    if not z.dtype.is_floating_point:
        raise TypeError(f"activation inputs must be floating point, got z of dtype {z.dtype}")
    if tangents.dim() != z.dim() + 1 or tangents.shape[1:] != z.shape:
        raise ValueError(
            f"tangents must have shape (b, *z.shape) = (b, {tuple(z.shape)}), "
            f"got {tuple(tangents.shape)}"
        )
    if tangents.dtype != z.dtype or tangents.device != z.device:
        raise TypeError(
            f"tangents ({tangents.dtype}, {tangents.device}) must match z ({z.dtype}, {z.device})"
        )


def check_backward_inputs(
    z: torch.Tensor,
    tangents: torch.Tensor | None,
    grad: torch.Tensor,
    grad_tangents: torch.Tensor,
    kind: str,
    curvature: str,
) -> None:
    """Validate the inputs of :func:`activation_hvp_backward`.

    Raises:
        ValueError: unknown ``kind``/``curvature`` or mismatched shapes.
        TypeError: mismatched dtype or device.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; expected one of {CURVATURES}")
    check_inputs(z, grad_tangents, kind)
    if grad.shape != z.shape:
        raise ValueError(f"grad must have the shape of z {tuple(z.shape)}, got {tuple(grad.shape)}")
    if grad.dtype != z.dtype or grad.device != z.device:
        raise TypeError(f"grad ({grad.dtype}, {grad.device}) must match z ({z.dtype}, {z.device})")
    if curvature == "hessian":
        if tangents is None:
            raise ValueError("curvature='hessian' needs the forward tangents of z")
        if tangents.shape != grad_tangents.shape:
            raise ValueError(
                f"tangents {tuple(tangents.shape)} and grad_tangents "
                f"{tuple(grad_tangents.shape)} must have one shape"
            )
        if tangents.dtype != z.dtype or tangents.device != z.device:
            raise TypeError(
                f"tangents ({tangents.dtype}, {tangents.device}) must match z "
                f"({z.dtype}, {z.device})"
            )


def _phi(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))


def primal(z: torch.Tensor, kind: str, negative_slope: float = 0.01) -> torch.Tensor:
    """``act(z)``."""
    if kind == "relu":
        return torch.relu(z)
    if kind == "leaky_relu":
        return torch.where(z > 0, z, z * negative_slope)
    if kind == "tanh":
        return torch.tanh(z)
    if kind == "sigmoid":
        return torch.sigmoid(z)
    if kind == "gelu":
        return z * _cdf(z)
    if kind == "gelu_tanh":
        # 0.5 z (1 + tanh u) = z sigmoid(2u), without the cancellation of 1 + tanh u for z << 0.
        return z * torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (z + _GELU_TANH_K * z**3))
    if kind == "silu":
        return z * torch.sigmoid(z)
    raise ValueError(f"unknown activation {kind!r}")


def derivatives(
    z: torch.Tensor, kind: str, negative_slope: float = 0.01, second: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(act'(z), act''(z))``; the second is None when ``second`` is False or it is zero."""
    if kind == "relu":
        return (z > 0).to(z.dtype), None
    if kind == "leaky_relu":
        one = torch.ones((), dtype=z.dtype, device=z.device)
        return torch.where(z > 0, one, one * negative_slope), None
    if kind == "tanh":
        t = torch.tanh(z)
        # 1 - t^2 = 4 s(2z) s(-2z): no cancellation for large |z|.
        d1 = 4.0 * torch.sigmoid(2.0 * z) * torch.sigmoid(-2.0 * z)
        return d1, (-2.0 * t * d1 if second else None)
    if kind == "sigmoid":
        s, s_c = torch.sigmoid(z), torch.sigmoid(-z)
        d1 = s * s_c
        return d1, (d1 * (s_c - s) if second else None)
    if kind == "gelu":
        phi = _phi(z)
        d1 = _cdf(z) + z * phi
        return d1, (phi * (2.0 - z * z) if second else None)
    if kind == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_K * z**3)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_K * z * z)
        # 0.5 (1 + t) = sigmoid(2u) and 1 - t^2 = 4 sigmoid(2u) sigmoid(-2u).
        s, s_c = torch.sigmoid(2.0 * u), torch.sigmoid(-2.0 * u)
        sech2 = 4.0 * s * s_c
        d1 = s + 0.5 * z * sech2 * du
        if not second:
            return d1, None
        ddu = _SQRT_2_OVER_PI * 6.0 * _GELU_TANH_K * z
        t = s - s_c
        return d1, sech2 * (du + 0.5 * z * (ddu - 2.0 * t * du * du))
    if kind == "silu":
        s, s_c = torch.sigmoid(z), torch.sigmoid(-z)
        d1 = s * (1.0 + z * s_c)
        return d1, (s * s_c * (2.0 + z * (s_c - s)) if second else None)
    raise ValueError(f"unknown activation {kind!r}")


def activation_jvp(
    z: torch.Tensor,
    tangents: torch.Tensor,
    kind: str,
    *,
    negative_slope: float = 0.01,
    write_primal: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Reference of :func:`imc_kernels.ops.activation_jvp`."""
    a = primal(z, kind, negative_slope) if write_primal else None
    d1, _ = derivatives(z, kind, negative_slope, second=False)
    return a, tangents * d1


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
    """Reference of :func:`imc_kernels.ops.activation_hvp_backward`."""
    d1, d2 = derivatives(z, kind, negative_slope, second=curvature == "hessian")
    g_z = grad * d1 if write_primal else None
    rg_z = grad_tangents * d1
    if d2 is not None:
        rg_z = rg_z + tangents * (d2 * grad)
    return g_z, rg_z
