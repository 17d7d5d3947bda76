"""The interface every per-layer HVP rule implements (one layer type per file).

A rule runs four passes for its module ``y = f(x; w)``:

* ``primal_forward(x) -> y`` once per operator, saving what later passes need;
* ``primal_backward(g_y, need_input_grad) -> g_x`` once per operator, saving ``g_y``;
* ``tangent_forward(rx, dparams) -> ry`` per product, ``rx=None`` meaning a zero tangent (the
  network input);
* ``tangent_backward(rg_y, need_input_grad) -> (rg_x, hv)`` per product: the tangent of the
  input gradient and the rule's block of ``H v`` (one ``(b, *p.shape)`` per parameter).

Activation tangents are laid out *sample-major, block-inner*: for a primal ``x`` of shape
``(N, *f)`` the block of b tangents is ``(N, b, *f)``. Products with a stacked weight tangent
(``x [dW_1 ... dW_b]^T``, ``conv(x, [dW_1; ...; dW_b])``) produce exactly this layout, and
products with the shared weight see it as a batch of ``N b`` samples (a free view), so no
activation-sized transpose is ever needed; only weight-sized ones. Parameter tangents and
products are ``(b, *p.shape)``.

Because the batch is fixed while a solver runs, the primal passes run once and every product
pays only for the tangent passes (Pearlmutter's R-op on a cached primal).
"""

from __future__ import annotations

import torch
from torch import nn


class LayerRule:
    """Base class: a parameter-free, shape-preserving identity (Dropout in eval, Identity)."""

    def __init__(self, module: nn.Module, curvature: str):
        self.module = module
        self.curvature = curvature
        self.hessian = curvature == "hessian"

    @property
    def params(self) -> list[torch.Tensor]:
        """The module's own parameters, in ``module.parameters()`` order."""
        return list(self.module.parameters(recurse=False))

    def primal_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def primal_backward(self, g_y: torch.Tensor, need_input_grad: bool) -> torch.Tensor | None:
        return g_y if need_input_grad else None

    def tangent_forward(
        self, rx: torch.Tensor | None, dparams: list[torch.Tensor | None]
    ) -> torch.Tensor | None:
        return rx

    def tangent_backward(
        self, rg_y: torch.Tensor, need_input_grad: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        return (rg_y if need_input_grad else None), []


def unsupported(module: nn.Module, why: str) -> str:
    """A reason string for the engine chooser."""
    return f"{type(module).__name__} ({why})"
