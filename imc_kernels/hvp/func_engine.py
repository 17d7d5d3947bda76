"""The ``func`` engine: forward-over-reverse with ``torch.func``, for any model.

Hessian: ``jvp(grad(L), (w,), (v,))`` (curvlinops' construction), ``vmap`` over a block.
GGN: ``J^T H_L J v`` as a ``jvp`` of the model output, the loss Hessian applied by a ``jvp``
of the loss gradient with respect to the output, and the ``vjp`` of the model output. The
``vjp`` closure is built once per operator (the primal is fixed while a solver runs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from imc_kernels.hvp._common import ParamLayout, call_model


class FuncEngine:
    """Hessian or GGN products through ``torch.func``; works for any differentiable model."""

    name = "func"

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        loss_fn: Callable,
        inputs,
        targets: torch.Tensor,
        curvature: str,
    ):
        self.layout = layout
        self.curvature = curvature
        primals = {name: p.detach() for name, p in zip(layout.names, layout.params)}
        frozen = {
            name: t.detach()
            for name, t in [*model.named_parameters(), *model.named_buffers()]
            if name not in primals
        }

        def output_of(params):
            return call_model(_Functional(model, params, frozen), inputs)

        def loss_of(params):
            return loss_fn(output_of(params), targets)

        self._primals = primals
        if curvature == "hessian":
            grad_fn = grad(loss_of)

            def product(tangent):
                return jvp(grad_fn, (primals,), (tangent,))[1]

        else:
            output, output_vjp = vjp(output_of, primals)
            loss_grad = grad(lambda out: loss_fn(out, targets))

            def product(tangent):
                _, j_v = jvp(output_of, (primals,), (tangent,))
                _, h_j_v = jvp(loss_grad, (output.detach(),), (j_v,))
                return output_vjp(h_j_v)[0]

        self._product = product
        self._block_product = vmap(product)

    def matmat(self, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per parameter ``(b, *shape)`` tangents -> per parameter ``(b, *shape)`` products."""
        block = dict(zip(self.layout.names, tangents))
        if tangents[0].shape[0] == 1:
            single = self._product({k: v[0] for k, v in block.items()})
            return [single[name].unsqueeze(0) for name in self.layout.names]
        out = self._block_product(block)
        return [out[name] for name in self.layout.names]


class _Functional:
    """Calls ``model`` with substituted parameters through ``functional_call``."""

    def __init__(self, model: nn.Module, params: dict, frozen: dict):
        self.model, self.params, self.frozen = model, params, frozen

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, (self.params, self.frozen), args, kwargs)
