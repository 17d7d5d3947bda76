"""HVP rule for ``nn.Linear``: ``y = x W^T + c``.

Shapes: ``x`` (R, K) with rows R = N (or N times any middle dims), ``W`` (M, K), ``c`` (M,);
block tangents ``rx`` (N, b, K) (sample-major, block-inner; see ``base.py``), ``dW``
(b, M, K), ``dc`` (b, M).

* tangent forward  ``ry_i = x dW_i^T + rx_i W^T + dc_i``
* primal backward  ``g_x = g_y W``
* tangent backward ``rg_x_i = rg_y_i W + g_y dW_i``           (second term: Hessian only)
* weight products  ``(Hv)_W,i = rg_y_i^T x + g_y^T rx_i``       (second term: Hessian only)
  ``(Hv)_c,i = sum_rows rg_y_i``

Every product has one operand shared by the block, so each is one large GEMM whose output is
already in the (R, b, .) layout: ``x [dW_1; ...; dW_b]^T`` is (R, K)(K, bM),
``[rx] W^T`` is (Rb, K)(K, M), ``g_y [dW_1 | ... | dW_b]`` is (R, M)(M, bK),
``rg_y^T x`` is (bM, R)(R, K) and ``g_y^T [rx]`` is (M, R)(R, bK).
For the first layer ``rx = 0``: its tangent work (4RKM per vector) equals the gradient's,
which keeps a product of an MLP near the cost of one gradient.

Every product goes through :func:`imc_kernels.ops.gemm` (oneDNN for float32 on the CPU, where
MKL's sgemm, torch's choice, is 2x slower on AMD processors; torch's GEMM elsewhere).
"""

from __future__ import annotations

import torch

from imc_kernels.hvp.layers.base import LayerRule
from imc_kernels.ops import gemm


class LinearRule(LayerRule):
    def primal_forward(self, x):
        self.x_shape = x.shape
        self.x = x.reshape(-1, x.shape[-1])
        y = gemm(self.x, self.module.weight.T)
        if self.module.bias is not None:
            y.add_(self.module.bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def primal_backward(self, g_y, need_input_grad):
        self.g_y = g_y.reshape(-1, g_y.shape[-1])
        if not need_input_grad:
            return None
        return gemm(self.g_y, self.module.weight).view(self.x_shape)

    # Tangents of inputs with middle dims, (N, b, *mid, K), are moved to rows (N*mid, b, K).
    def _to_rows(self, t):
        if len(self.x_shape) == 2:
            return t
        return t.movedim(1, -2).reshape(self.x.shape[0], t.shape[1], t.shape[-1])

    def _from_rows(self, t):
        if len(self.x_shape) == 2:
            return t
        n, mid = self.x_shape[0], self.x_shape[1:-1]
        return t.view(n, *mid, t.shape[1], t.shape[-1]).movedim(-2, 1).contiguous()

    def tangent_forward(self, rx, dparams):
        weight = self.module.weight
        d_weight = dparams[0]
        d_bias = dparams[1] if self.module.bias is not None else None
        self.rx = None if rx is None else self._to_rows(rx)
        self.d_weight = d_weight
        if self.rx is None and d_weight is None and d_bias is None:
            return None  # frozen layer on the network input: no tangent flows yet
        rows, (m, k) = self.x.shape[0], weight.shape
        b = (
            next(t.shape[0] for t in (d_weight, d_bias) if t is not None)
            if rx is None
            else (rx.shape[1])
        )
        if d_weight is not None:
            ry = self.kept("ry", (rows, b, m), self.x)
            gemm(self.x, d_weight.reshape(b * m, k).T, out=ry.view(rows, b * m))
            if self.rx is not None:
                gemm(self.rx.reshape(rows * b, k), weight.T, out=ry.view(rows * b, m), beta=1.0)
        elif self.rx is not None:
            ry = self.kept("ry", (rows, b, m), self.x)
            gemm(self.rx.reshape(rows * b, k), weight.T, out=ry.view(rows * b, m))
        else:
            ry = torch.zeros(rows, b, m, dtype=weight.dtype, device=weight.device)
        if d_bias is not None:
            ry.add_(d_bias)
        return self._from_rows(ry)

    def tangent_backward(self, rg_y, need_input_grad):
        weight = self.module.weight
        m, k = weight.shape
        rg_y = self._to_rows(rg_y)
        rows, b = rg_y.shape[:2]
        hv_weight = hv_bias = None
        if weight.requires_grad:
            # A single vector's weight product straight into the operator's output when the
            # engine offers it (no 940 KB copy per product for LeNet-300-100's first layer).
            dest = self.destination(0, b)
            dest = None if dest is None else dest.view(m, k)
            hv_weight = gemm(rg_y.reshape(rows, b * m).T, self.x, out=dest).view(b, m, k)
            if self.hessian and self.rx is not None:
                g_rx = gemm(self.g_y.T, self.rx.reshape(rows, b * k)).view(m, b, k)
                hv_weight.add_(g_rx.transpose(0, 1))
        if self.module.bias is not None and self.module.bias.requires_grad:
            hv_bias = rg_y.sum(dim=0)
        rg_x = None
        if need_input_grad:
            rg_x = self.kept("rg_x", (rows, b, k), self.x)
            if self.hessian and self.d_weight is not None:
                stacked = self.d_weight.transpose(0, 1).reshape(m, b * k)  # weight-sized copy
                gemm(self.g_y, stacked, out=rg_x.view(rows, b * k))
                gemm(rg_y.reshape(rows * b, m), weight, out=rg_x.view(rows * b, k), beta=1.0)
            else:
                gemm(rg_y.reshape(rows * b, m), weight, out=rg_x.view(rows * b, k))
            rg_x = self._from_rows(rg_x)
        hv = [hv_weight] + ([hv_bias] if self.module.bias is not None else [])
        return rg_x, hv
