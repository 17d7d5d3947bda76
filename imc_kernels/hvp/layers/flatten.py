"""HVP rule for ``nn.Flatten`` (and ``nn.Unflatten``-free reshapes): a pure view.

Tangents carry a block dimension after the samples, so the flattened range shifts by one.
"""

from __future__ import annotations

from imc_kernels.hvp.layers.base import LayerRule


class FlattenRule(LayerRule):
    def primal_forward(self, x):
        self.x_shape = x.shape
        self.start = self.module.start_dim % x.dim()
        self.end = self.module.end_dim % x.dim()
        if self.start == 0:
            raise ValueError(
                "the fused engine keeps samples apart; nn.Flatten(start_dim=0) merges them "
                "(use engine='func')"
            )
        return x.flatten(self.start, self.end)

    def primal_backward(self, g_y, need_input_grad):
        return g_y.reshape(self.x_shape) if need_input_grad else None

    def tangent_forward(self, rx, dparams):
        if rx is None:
            return None
        # Tangents are (N, b, *f): the flattened range moves one dimension right.
        return rx.flatten(self.start + 1, self.end + 1)

    def tangent_backward(self, rg_y, need_input_grad):
        if not need_input_grad:
            return None, []
        return rg_y.reshape(self.x_shape[0], rg_y.shape[1], *self.x_shape[1:]), []
