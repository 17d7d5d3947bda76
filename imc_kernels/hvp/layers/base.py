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

import math

import torch
from torch import nn


class LayerRule:
    """Base class: a parameter-free, shape-preserving identity (Dropout in eval, Identity)."""

    def __init__(self, module: nn.Module, curvature: str):
        self.module = module
        self.curvature = curvature
        self.hessian = curvature == "hessian"
        # Flat buffers for activation-sized tangents, by role, reused by every product on the
        # CPU (see kept()).
        self.workspace: dict[str, torch.Tensor] = {}

    def kept(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A ``shape`` buffer for ``role`` (dtype and device of ``like``), uninitialised.

        On the CPU the buffer is kept and reused by the next product (it grows, never
        shrinks; a block of a new size takes the front of a larger one). Fresh tensors of
        activation size are what made CPU block products slow: glibc returns allocations
        over its mmap threshold (at most 32 MiB) to the kernel on free, so every product
        page-faulted its largest tangents back in (the small CNN at b = 4, batch 512: 0.91 x
        a gradient per vector with fresh buffers, 0.78 x without the faults). Elsewhere
        (CUDA) the caching allocator already reuses memory, and a kept buffer would only pin
        it, so a fresh tensor is returned.

        Safe to overwrite on the next product: every consumer reads a tangent within the
        product that made it, and the products (Hv) handed to the caller are never kept
        buffers. One operator must not run two products at once (from two threads).
        """
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        numel = math.prod(shape)
        buffer = self.workspace.get(role)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.workspace[role] = buffer
        return buffer[:numel].view(shape)

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
