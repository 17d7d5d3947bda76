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

from imc_kernels.hvp._common import ParamLayout, call_model, is_mse
from imc_kernels.hvp.double_backward import check_weight_norm


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
        check_weight_norm(model)  # no forward-mode rule; its double backward is wrong
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

        loss_fn = _functional_loss(loss_fn)

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
        try:
            if tangents[0].shape[0] == 1:
                single = self._product({k: v[0] for k, v in block.items()})
                return [single[name].unsqueeze(0) for name in self.layout.names]
            out = self._block_product(block)
        except NotImplementedError as exc:
            # An op without a forward-mode rule (old-style nn.utils.weight_norm's
            # _weight_norm_interface, some custom autograd Functions).
            raise NotImplementedError(
                f"the func engine (forward-mode AD) cannot differentiate this model: {exc}; "
                "use engine='double_backward' (reverse-over-reverse, Hessian products)"
            ) from exc
        return [out[name] for name in self.layout.names]


def _functional_loss(loss_fn: Callable) -> Callable:
    """``loss_fn``, with MSE written out: ``jvp(grad(mse_loss))`` with mean reduction fails
    inside torch.func ("ZeroTensors are immutable", pytorch#123996)."""
    if not is_mse(loss_fn):
        return loss_fn
    reduction = getattr(loss_fn, "reduction", "mean")

    def mse(output, targets):
        squares = (output - targets) ** 2
        return squares.mean() if reduction == "mean" else squares.sum()

    return mse


class _Functional:
    """Calls ``model`` with substituted parameters through ``functional_call``.

    A module reachable under two names (the same Linear used twice) has its parameter slot
    swapped twice by ``functional_call``, and the restore leaves a functorch wrapper behind
    (pytorch#164759); every module's slots are snapshotted and put back after the call.
    """

    def __init__(self, model: nn.Module, params: dict, frozen: dict):
        self.model, self.params, self.frozen = model, params, frozen

    def __call__(self, *args, **kwargs):
        saved = [(m, dict(m._parameters), dict(m._buffers)) for m in self.model.modules()]
        try:
            return functional_call(self.model, (self.params, self.frozen), args, kwargs)
        finally:
            for module, parameters, buffers in saved:
                module._parameters.update(parameters)
                module._buffers.update(buffers)
