"""HVP rule for eval-mode ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` (running statistics).

In eval mode BatchNorm is a per-channel affine map: ``xh = (x - mu) s``,
``s = 1/sqrt(var + eps)``, ``y = xh gamma + beta``, so its only second-order terms couple the
input tangent with the scale tangent. Channels are dimension 1 of ``x``; shapes (N, C) or
(N, C, L) or (N, C, H, W).

* tangent forward  ``ry_i = rx_i s gamma + xh dgamma_i + dbeta_i``
* primal backward  ``g_x = g_y gamma s``
* tangent backward ``rg_x_i = rg_y_i gamma s + g_y dgamma_i s``          (second: Hessian only)
* parameter products ``(Hv)_gamma,i = sum(rg_y_i xh + g_y rx_i s)``      (second: Hessian only)
  ``(Hv)_beta,i = sum(rg_y_i)``, sums over every dimension but channels

Train-mode BatchNorm couples the rows of the batch; the operator runs the model in eval mode.
"""

from __future__ import annotations

import torch

from imc_kernels.hvp.layers.base import LayerRule, unsupported


def batchnorm_unsupported_reason(module) -> str | None:
    if not module.track_running_stats or module.running_mean is None:
        return unsupported(module, "no running statistics: eval mode still uses batch statistics")
    return None


class BatchNormRule(LayerRule):
    def _channel(self, t, ndim):
        """A (C,) tensor shaped to broadcast over an ``ndim``-dimensional activation."""
        return t.view(1, -1, *([1] * (ndim - 2)))

    def primal_forward(self, x):
        m = self.module
        ndim = x.dim()
        self.scale = self._channel(torch.rsqrt(m.running_var + m.eps), ndim)
        self.x_hat = (x - self._channel(m.running_mean, ndim)) * self.scale
        # Primal factors of the tangent passes, computed once per operator.
        if m.affine:
            gamma = self._channel(m.weight, ndim)
            self.gamma_scale = gamma * self.scale
            return self.x_hat * gamma + self._channel(m.bias, ndim)
        self.gamma_scale = self.scale
        return self.x_hat.clone()

    def primal_backward(self, g_y, need_input_grad):
        self.g_y = g_y
        self.g_y_scale = g_y * self.scale if self.hessian else None
        return g_y * self.gamma_scale if need_input_grad else None

    # Tangents are (N, b, C, *spatial): per-channel primal tensors gain a block axis at 1,
    # per-tangent (b, C) parameters become (1, b, C, 1, ...). Every block-sized result is
    # written in place into a kept buffer (one pass each, no block-sized temporaries).
    def _tangent_channel(self, t):
        return t.unsqueeze(1)

    def _block_channel(self, d):
        return d.view(1, *d.shape, *([1] * (self.x_hat.dim() - 2)))

    def tangent_forward(self, rx, dparams):
        self.rx = rx
        self.d_gamma = dparams[0] if self.module.affine else None
        d_beta = dparams[1] if self.module.affine else None
        block = rx if rx is not None else next((d for d in dparams if d is not None), None)
        if block is None:
            return None
        n, b = self.x_hat.shape[0], (rx.shape[1] if rx is not None else block.shape[0])
        ry = self.kept("ry", (n, b, *self.x_hat.shape[1:]), self.x_hat)
        if rx is not None:
            torch.mul(rx, self._tangent_channel(self.gamma_scale), out=ry)
        if self.d_gamma is not None:
            x_hat, d_gamma = self._tangent_channel(self.x_hat), self._block_channel(self.d_gamma)
            if rx is None:
                torch.mul(x_hat, d_gamma, out=ry)
            else:
                ry.addcmul_(x_hat, d_gamma)
        if d_beta is not None:
            if rx is None and self.d_gamma is None:
                ry.copy_(self._block_channel(d_beta).expand_as(ry))
            else:
                ry.add_(self._block_channel(d_beta))
        return ry

    def _channel_sums(self, a, b):
        """``sum(a * b)`` over every axis but the block and channel axes, as (b, C)."""
        product = torch.mul(
            a, b, out=self.kept("product", torch.broadcast_shapes(a.shape, b.shape), a)
        )
        return product.sum(dim=(0, *range(3, product.dim())))

    def tangent_backward(self, rg_y, need_input_grad):
        m = self.module
        hv = []
        if m.affine:
            hv_gamma = hv_beta = None
            if m.weight.requires_grad:
                hv_gamma = self._channel_sums(rg_y, self._tangent_channel(self.x_hat))
                if self.hessian and self.rx is not None:
                    hv_gamma += self._channel_sums(self.rx, self._tangent_channel(self.g_y_scale))
            if m.bias.requires_grad:
                hv_beta = rg_y.sum(dim=(0, *range(3, rg_y.dim())))
            hv = [hv_gamma, hv_beta]
        rg_x = None
        if need_input_grad:
            rg_x = torch.mul(
                rg_y,
                self._tangent_channel(self.gamma_scale),
                out=self.kept("rg_x", rg_y.shape, rg_y),
            )
            if self.hessian and self.d_gamma is not None:
                rg_x.addcmul_(
                    self._block_channel(self.d_gamma), self._tangent_channel(self.g_y_scale)
                )
        return rg_x, hv
