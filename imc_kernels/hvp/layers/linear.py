"""HVP rule for ``nn.Linear``: ``y = x W^T + c``.

Shapes: ``x`` (R, K) after flattening leading dims into rows R, ``W`` (M, K), ``c`` (M,);
a block of b tangents ``dW`` (b, M, K), ``dc`` (b, M), ``rx`` (b, R, K).

* tangent forward  ``ry_i = x dW_i^T + rx_i W^T + dc_i``
* primal backward  ``g_x = g_y W``
* tangent backward ``rg_x_i = rg_y_i W + g_y dW_i``           (second term: Hessian only)
* weight products  ``(Hv)_W,i = rg_y_i^T x + g_y^T rx_i``       (second term: Hessian only)
  ``(Hv)_c,i = sum_rows rg_y_i``

Every product has one operand shared by the block, so each becomes one large GEMM:
``x [dW_1; ...; dW_b]^T`` is (R, K)(K, bM) and ``[rx_1; ...; rx_b] W^T`` is (bR, K)(K, M).
For the first layer ``rx = 0``: its tangent work (4RKM per vector) equals the gradient's, which
is what keeps a product of an MLP near the cost of one gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imc_kernels.hvp.layers.base import LayerRule


class LinearRule(LayerRule):
    def primal_forward(self, x):
        self.x_shape = x.shape
        self.x = x.reshape(-1, x.shape[-1])
        y = F.linear(self.x, self.module.weight, self.module.bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def primal_backward(self, g_y, need_input_grad):
        self.g_y = g_y.reshape(-1, g_y.shape[-1])
        if not need_input_grad:
            return None
        return (self.g_y @ self.module.weight).view(self.x_shape)

    def tangent_forward(self, rx, dparams):
        weight = self.module.weight
        d_weight = dparams[0]
        d_bias = dparams[1] if self.module.bias is not None else None
        rows, (m, k) = self.x.shape[0], weight.shape
        self.rx = None if rx is None else rx.reshape(rx.shape[0], rows, k)
        self.d_weight = d_weight
        if self.rx is None and d_weight is None and d_bias is None:
            return None  # frozen layer on the network input: no tangent flows yet
        b = _block_size(rx, dparams)
        ry = None
        if self.rx is not None:
            ry = (self.rx.reshape(-1, k) @ weight.T).view(b, rows, m)
        if d_weight is not None:
            # One (R, K) x (K, bM) GEMM for the whole block, then a strided add.
            x_dw = (self.x @ d_weight.reshape(b * m, k).T).view(rows, b, m).transpose(0, 1)
            ry = x_dw.contiguous() if ry is None else ry.add_(x_dw)
        if d_bias is not None:
            ry = (
                d_bias.unsqueeze(1).expand(b, rows, m).clone()
                if ry is None
                else ry.add_(d_bias.unsqueeze(1))
            )
        if ry is None:
            return None
        return ry.view(b, *self.x_shape[:-1], m)

    def tangent_backward(self, rg_y, need_input_grad):
        weight = self.module.weight
        m, k = weight.shape
        b = rg_y.shape[0]
        rg_y = rg_y.reshape(b, -1, m)
        hv_weight = hv_bias = None
        if weight.requires_grad:
            hv_weight = torch.matmul(rg_y.transpose(1, 2), self.x)
            if self.hessian and self.rx is not None:
                hv_weight.add_(torch.matmul(self.g_y.T, self.rx))
        if self.module.bias is not None and self.module.bias.requires_grad:
            hv_bias = rg_y.sum(dim=1)
        rg_x = None
        if need_input_grad:
            rg_x = (rg_y.reshape(-1, m) @ weight).view(b, -1, k)
            if self.hessian and self.d_weight is not None:
                rg_x.add_(torch.matmul(self.g_y, self.d_weight))
            rg_x = rg_x.view(b, *self.x_shape)
        hv = [hv_weight] + ([hv_bias] if self.module.bias is not None else [])
        return rg_x, hv


def _block_size(rx, dparams) -> int:
    if rx is not None:
        return rx.shape[0]
    for d in dparams:
        if d is not None:
            return d.shape[0]
    raise ValueError("a linear rule received no tangent at all")
