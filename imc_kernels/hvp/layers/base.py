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
import weakref

import torch
from torch import nn

from imc_kernels._memory import byte_budget

ENV_WORKSPACE_BYTES = "IMC_HVP_WORKSPACE_BYTES"
DEFAULT_WORKSPACE_FRACTION = 8  # of physical memory


def default_workspace_bytes() -> int:
    """The kept-buffer budget of one operator: ``IMC_HVP_WORKSPACE_BYTES`` if set, else
    one eighth of physical memory (2 GiB where that cannot be read).

    Raises:
        ValueError: the variable is not a non-negative integer.
    """
    return byte_budget(
        ENV_WORKSPACE_BYTES, DEFAULT_WORKSPACE_FRACTION, 2 * 2**30, "0 keeps no buffer"
    )


class Workspace:
    """Activation-sized tangent buffers kept from one CPU product to the next, in a budget.

    Fresh tensors of activation size are what made CPU block products slow: glibc returns
    allocations over its mmap threshold (at most 32 MiB) to the kernel when they are freed,
    so every product page-faulted its largest tangents back in (the small CNN, batch 512,
    b = 4, one thread: 0.91 gradients per vector with fresh tensors, 0.62-0.70 kept). A
    buffer grows and never shrinks; a block of a new size takes the front of a larger one.

    Kept buffers persist between products, so they cost memory that fresh tensors return
    after each product (up to about twice a product's own peak). ``limit_bytes`` caps them
    (default :func:`default_workspace_bytes`); a buffer that would pass the cap is a fresh
    tensor instead. On other devices (CUDA) the caching allocator already reuses memory and
    a kept buffer would only pin it, so every request is a fresh tensor.

    Buffers come from and go back to ``imc_kernels.linalg.buffers``, the cache of large CPU
    buffers the solver uses for its basis: a buffer outgrown by a larger block, and all of
    them when the workspace is collected (with its operator), so that the next operator on
    the same shapes takes them instead of fresh memory. The cache keeps only buffers nothing
    else refers to, within its own byte limit (``IMC_SOLVER_CACHE_BYTES``).
    """

    def __init__(self, limit_bytes: int | None = None):
        self.limit_bytes = default_workspace_bytes() if limit_bytes is None else limit_bytes
        self.buffers: dict[tuple, torch.Tensor] = {}
        # The buffers go to the solver's buffer cache when the workspace dies (see _release);
        # not at interpreter exit, where no later operator could take them.
        weakref.finalize(self, _release, self.buffers).atexit = False

    def holds(self, key: tuple, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in the buffer kept for ``key``."""
        buffer = self.buffers.get(key)
        return (
            buffer is not None
            and tensor.device == buffer.device
            and tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        )

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def get(self, key: tuple, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A ``shape`` buffer (dtype and device of ``like``) for ``key``, uninitialised."""
        numel = math.prod(shape)
        buffer = self.buffers.get(key)
        if like.device.type == "cpu":
            if buffer is not None and buffer.numel() >= numel and buffer.dtype == like.dtype:
                return buffer[:numel].view(shape)
            held = 0 if buffer is None else buffer.numel() * buffer.element_size()
            if self.nbytes - held + numel * like.element_size() <= self.limit_bytes:
                from imc_kernels.linalg import buffers as cache

                if buffer is not None:
                    cache.give(self.buffers.pop(key))
                buffer = cache.take(numel, like.dtype, like.device)
                self.buffers[key] = buffer
                return buffer.view(shape)
        return torch.empty(shape, dtype=like.dtype, device=like.device)


def _release(kept: dict[tuple, torch.Tensor]) -> None:
    """Hand a dead workspace's buffers to ``imc_kernels.linalg.buffers`` (the solver's cache
    of large CPU buffers, which keeps those nothing else refers to, within its limit), so the
    next operator on a batch of the same shapes reuses them instead of page-faulting fresh
    memory in: on the small CNN, batch 512, one thread, the first products of an operator
    ran ~10 ms slower each and its pooled-patch matrix took ~40 ms to build fresh."""
    from imc_kernels.linalg import buffers as cache

    while kept:
        cache.give(kept.popitem()[1])


class LayerRule:
    """Base class: a parameter-free, shape-preserving identity (Dropout in eval, Identity)."""

    def __init__(self, module: nn.Module, curvature: str):
        self.module = module
        self.curvature = curvature
        self.hessian = curvature == "hessian"
        # Where kept() finds its buffers; the fused engine gives all its rules one.
        self.workspace = Workspace()
        # The engine's choice of shared buffer for this product's "rg_x" (see kept()).
        self.backward_key: tuple | None = None
        # Set by the fused engine for a single-vector product: per parameter, a view of the
        # operator's output where the rule may write that parameter's product directly (None:
        # return it as usual). Cleared after each product.
        self.destinations: list[torch.Tensor | None] | None = None

    # What a product stores on the rule for its backward half: views of the caller's block
    # (the parameter tangents) and tangents of the layer input. Dropped after each product
    # (forget_tangents): kept, they held the solver's basis alive, which then never returned
    # to the buffer cache (a fresh 33 MB basis, ~8,000 page faults, per MLP solve).
    TANGENT_ATTRIBUTES = ("rx", "rz", "d_weight", "d_gamma")

    def forget_tangents(self) -> None:
        """Drop the references a product left on the rule (see ``TANGENT_ATTRIBUTES``)."""
        for name in self.TANGENT_ATTRIBUTES:
            if name in self.__dict__:
                setattr(self, name, None)

    def destination(self, index: int, b: int) -> torch.Tensor | None:
        """Where parameter ``index``'s product of a ``b``-vector block may be written in place
        (``b = 1`` only), or None."""
        if b != 1 or self.destinations is None:
            return None
        return self.destinations[index]

    def kept(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised ``shape`` buffer for this rule's ``role``, kept on the CPU.

        See :class:`Workspace`. Safe to overwrite on the next product: every consumer reads
        a tangent within the product that made it, a rule writes a role again only once
        its last contents are consumed, and the products (Hv) handed to the caller are never
        kept buffers. One operator must
        not run two products at once (from two threads).

        The role ``"rg_x"`` (the tangent of the input gradient, a rule's backward output) is
        dead once the rule before has read it, so the fused engine points it at one of two
        buffers shared by all rules (``backward_key``), the one not holding the rule's own
        input: backward tangents cost two buffers, not one per layer.
        """
        if role == "rg_x" and self.backward_key is not None:
            return self.workspace.get(self.backward_key, shape, like)
        return self.workspace.get((id(self), role), shape, like)

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
