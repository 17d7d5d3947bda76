"""HVP rules for ``nn.MaxPool2d``, ``nn.AvgPool2d`` and ``nn.AdaptiveAvgPool2d``.

All three are (piecewise) linear in their input, so their second derivative vanishes (a.e.
for max pooling) and the tangent passes are the primal passes applied to each tangent:

* max pool: ``ry_i = rx_i[argmax]`` through the indices saved by the primal forward, and
  ``rg_x_i = scatter_add(rg_y_i, argmax)`` (overlapping windows add);
* average pools: the same linear pooling forward, and its adjoint backward.

The block dimension of the (N, b, C, H, W) tangents folds into the batch (a free view), so
every tangent pass is one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imc_kernels.hvp.layers.base import LayerRule


class MaxPool2dRule(LayerRule):
    # Set by Conv2dRule.absorb_max_pool: the convolution before computes the pooled tangents
    # itself and takes the pooled rg_y, so both tangent passes hand their input through.
    absorbed = False

    def primal_forward(self, x):
        m = self.module
        y, indices = F.max_pool2d(
            x,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            ceil_mode=m.ceil_mode,
            return_indices=True,
        )
        self.x_shape, self.y_shape = x.shape, y.shape
        self.indices = indices.flatten(-2)  # (N, C, Ho*Wo) into flattened (H*W) planes
        return y

    # Tangents are (N, b, C, H, W); the saved indices broadcast over the block dimension.
    def _index(self, b):
        n, *rest = self.indices.shape
        return self.indices.unsqueeze(1).expand(n, b, *rest)

    def _gather(self, t, out):
        n, b = t.shape[:2]
        index = self._index(b)
        torch.gather(t.flatten(-2), -1, index, out=out.view(index.shape))
        return out

    def _scatter(self, t, out):
        n, b = t.shape[:2]
        plane = self.x_shape[-2] * self.x_shape[-1]
        flat = out.view(n, b, *self.x_shape[1:-2], plane).zero_()
        flat.scatter_add_(-1, self._index(b), t.flatten(-2))
        return out

    def primal_backward(self, g_y, need_input_grad):
        if not need_input_grad:
            return None
        g_x = g_y.new_empty(self.x_shape)
        return self._scatter(g_y.unsqueeze(1), g_x.unsqueeze(1))[:, 0]

    # The tangents go to kept buffers (LayerRule.kept): the scatter's zeroed output is the
    # largest tangent of a CNN product (the pre-pool resolution, b vectors).
    def tangent_forward(self, rx, dparams):
        if rx is None or self.absorbed:
            return rx
        n, b = rx.shape[:2]
        return self._gather(rx, self.kept("ry", (n, b, *self.y_shape[1:]), rx))

    def tangent_backward(self, rg_y, need_input_grad):
        if not need_input_grad:
            return None, []
        if self.absorbed:
            return rg_y, []
        n, b = rg_y.shape[:2]
        return self._scatter(rg_y, self.kept("rg_x", (n, b, *self.x_shape[1:]), rg_y)), []


class AvgPool2dRule(LayerRule):
    """``nn.AvgPool2d`` and ``nn.AdaptiveAvgPool2d``: linear, so tangents reuse the primal op."""

    def _pool(self, x):
        m = self.module
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return F.adaptive_avg_pool2d(x, m.output_size)
        return F.avg_pool2d(
            x,
            m.kernel_size,
            m.stride,
            m.padding,
            m.ceil_mode,
            m.count_include_pad,
            m.divisor_override,
        )

    def _adjoint(self, g_y):
        m = self.module
        shape = (g_y.shape[0], *self.x_shape[1:])
        # The backward ops read only the input's shape; an uninitialised tensor is enough.
        like = g_y.new_empty(shape)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return torch.ops.aten._adaptive_avg_pool2d_backward(g_y, like)
        kernel = _pair(m.kernel_size)
        stride = _pair(m.stride if m.stride is not None else m.kernel_size)
        return torch.ops.aten.avg_pool2d_backward(
            g_y,
            like,
            kernel,
            stride,
            _pair(m.padding),
            m.ceil_mode,
            m.count_include_pad,
            m.divisor_override,
        )

    def primal_forward(self, x):
        self.x_shape = x.shape
        return self._pool(x)

    def primal_backward(self, g_y, need_input_grad):
        return self._adjoint(g_y) if need_input_grad else None

    def tangent_forward(self, rx, dparams):
        if rx is None:
            return None
        n, b = rx.shape[:2]
        y = self._pool(rx.flatten(0, 1))
        return y.view(n, b, *y.shape[1:])

    def tangent_backward(self, rg_y, need_input_grad):
        if not need_input_grad:
            return None, []
        n, b = rg_y.shape[:2]
        return self._adjoint(rg_y.flatten(0, 1)).view(n, b, *self.x_shape[1:]), []


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
