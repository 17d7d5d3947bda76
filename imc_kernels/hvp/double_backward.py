"""The ``double_backward`` engine: reverse-over-reverse, what PyHessian does.

The gradient graph is built once (``create_graph=True``) when the operator is made and every
product differentiates ``g . v`` through it (``retain_graph=True``): PyHessian's reuse trick.
It is the baseline and the fallback for models whose ops lack forward-mode rules; it keeps
the double-backward graph alive, so it is also the memory-heavy one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from imc_kernels.hvp._common import ParamLayout, call_model


class DoubleBackwardEngine:
    """Hessian products by differentiating the gradient graph a second time."""

    name = "double_backward"

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        loss_fn: Callable,
        inputs,
        targets: torch.Tensor,
        curvature: str,
    ):
        if curvature != "hessian":
            raise ValueError(
                "engine='double_backward' computes Hessian products only; use engine='fused' "
                "or engine='func' for curvature='ggn'"
            )
        self.layout = layout
        with torch.enable_grad():
            loss = loss_fn(call_model(model, inputs), targets)
            self._grads = torch.autograd.grad(loss, layout.params, create_graph=True)
        self._batched_ok = True

    def matmat(self, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per parameter ``(b, *shape)`` tangents -> per parameter ``(b, *shape)`` products."""
        b = tangents[0].shape[0]
        if b > 1 and self._batched_ok:
            try:
                return list(self._grad(tangents, batched=True))
            except RuntimeError:
                # vmap over the backward needs batching rules for every op in the graph;
                # fall back to one backward per vector.
                self._batched_ok = False
        columns = [self._grad([t[i] for t in tangents], batched=False) for i in range(b)]
        return [torch.stack(per_param) for per_param in zip(*columns)]

    def _grad(self, tangents, batched: bool):
        with torch.enable_grad():
            return torch.autograd.grad(
                self._grads,
                self.layout.params,
                grad_outputs=tangents,
                retain_graph=True,
                is_grads_batched=batched,
                allow_unused=True,
                materialize_grads=True,
            )
