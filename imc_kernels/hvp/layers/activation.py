"""HVP rule for elementwise activations ``a = act(z)``.

* tangent forward  ``ra_i = act'(z) rz_i``
* primal backward  ``g_z = act'(z) g_a``
* tangent backward ``rg_z_i = act'(z) rg_a_i + act''(z) rz_i g_a``  (second term: Hessian only;
  zero a.e. for ReLU and LeakyReLU)

The primal and the whole block go through one fused kernel per pass
(:func:`imc_kernels.ops.activation_jvp`, :func:`imc_kernels.ops.activation_hvp_backward`):
Triton on GPU, the pure-PyTorch twin on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from imc_kernels import _dispatch, ops
from imc_kernels.hvp.layers.base import LayerRule
from imc_kernels.reference import activation as reference

# The activation classes with a rule (what activation_kind matches, subclasses included).
ACTIVATION_CLASSES = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU)


def activation_kind(module: nn.Module) -> tuple[str, float] | None:
    """``(kind, negative_slope)`` for a supported activation module, else None."""
    if isinstance(module, nn.ReLU):
        return "relu", 0.0
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.Tanh):
        return "tanh", 0.0
    if isinstance(module, nn.Sigmoid):
        return "sigmoid", 0.0
    if isinstance(module, nn.GELU):
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.0
    if isinstance(module, nn.SiLU):
        return "silu", 0.0
    return None


class ActivationRule(LayerRule):
    # Set by Conv2dRule.absorb_activation: the pooled input convolution before folds act'(z)
    # into its patches, so both tangent passes hand their input through.
    absorbed = False

    def __init__(self, module, curvature):
        super().__init__(module, curvature)
        self.kind, self.negative_slope = activation_kind(module)

    def primal_forward(self, x):
        self.z = x
        # act'(z) and act''(z) are primal quantities: on the reference path (CPU) compute them
        # once per operator instead of once per product. The Triton kernels recompute them in
        # registers from z, which reads no more bytes than a cached derivative would.
        backend = _dispatch.select(
            "activation", x.device, x.dtype, available=("triton", "reference")
        )
        self.derivatives = None
        if backend == "reference":
            d1, d2 = reference.derivatives(x, self.kind, self.negative_slope, self.hessian)
            self.derivatives = (d1.unsqueeze(1), None if d2 is None else d2.unsqueeze(1))
        a, _ = ops.activation_jvp(
            x, x.new_empty((0, *x.shape)), self.kind, negative_slope=self.negative_slope
        )
        return a

    def primal_backward(self, g_y, need_input_grad):
        self.g_a = g_y
        # The second-derivative term's primal factor act''(z) g_a, once per operator.
        d2 = None if self.derivatives is None else self.derivatives[1]
        self.d2_g_a = None if d2 is None else d2 * g_y.unsqueeze(1)
        if not need_input_grad:
            return None
        g_z, _ = ops.activation_hvp_backward(
            self.z,
            None,
            g_y,
            g_y.new_empty((0, *g_y.shape)),
            self.kind,
            negative_slope=self.negative_slope,
            curvature="ggn",
            write_primal=True,
        )
        return g_z

    def tangent_forward(self, rx, dparams):
        self.rz = rx
        if rx is None or self.absorbed:
            return rx
        if self.derivatives is not None:
            return torch.mul(rx, self.derivatives[0], out=self.kept("ra", rx.shape, rx))
        _, ra = ops.activation_jvp(
            self.z,
            _block_first(rx),
            self.kind,
            negative_slope=self.negative_slope,
            write_primal=False,
        )
        return _sample_first(ra)

    def tangent_backward(self, rg_y, need_input_grad):
        if not need_input_grad:
            return None, []
        if self.absorbed:
            return rg_y, []
        if self.derivatives is not None:
            rg_z = torch.mul(rg_y, self.derivatives[0], out=self.kept("rg_x", rg_y.shape, rg_y))
            if self.d2_g_a is not None and self.rz is not None:
                rg_z += self.rz * self.d2_g_a
            return rg_z, []
        # Without a forward tangent (rz = 0) the second-derivative term vanishes.
        curvature = "hessian" if self.hessian and self.rz is not None else "ggn"
        _, rg_z = ops.activation_hvp_backward(
            self.z,
            None if self.rz is None else _block_first(self.rz),
            self.g_a,
            _block_first(rg_y),
            self.kind,
            negative_slope=self.negative_slope,
            curvature=curvature,
        )
        return _sample_first(rg_z), []


def _block_first(t):
    """(N, b, *f) -> the (b, N, *f) view the elementwise ops take (no copy)."""
    return t.transpose(0, 1)


def _sample_first(t):
    """(b, N, *f) -> (N, b, *f); free when the op preserved the input's memory layout."""
    return t.transpose(0, 1).contiguous()
