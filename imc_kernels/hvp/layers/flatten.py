"""HVP rule for ``nn.Flatten`` (and ``nn.Unflatten``-free reshapes): a pure view.

Tangents carry a leading block dimension, so the flattened range shifts by one.
"""

from __future__ import annotations

from imc_kernels.hvp.layers.base import LayerRule


class FlattenRule(LayerRule):
    def primal_forward(self, x):
        self.x_shape = x.shape
        return x.flatten(self.module.start_dim, self.module.end_dim)

    def primal_backward(self, g_y, need_input_grad):
        return g_y.reshape(self.x_shape) if need_input_grad else None

    def _shift(self, dim):
        return dim + 1 if dim >= 0 else dim

    def tangent_forward(self, rx, dparams):
        if rx is None:
            return None
        return rx.flatten(self._shift(self.module.start_dim), self._shift(self.module.end_dim))

    def tangent_backward(self, rg_y, need_input_grad):
        if not need_input_grad:
            return None, []
        return rg_y.reshape(rg_y.shape[0], *self.x_shape), []
