"""The ``double_backward`` engine: reverse-over-reverse, what PyHessian does.

The gradient graph is built once (``create_graph=True``) when the operator is made and every
product differentiates ``g . v`` through it (``retain_graph=True``): PyHessian's reuse trick.
It is the baseline and the fallback for models whose ops lack forward-mode rules; it keeps
the double-backward graph alive, so it is also the memory-heavy one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrizations as _parametrizations
from torch.nn.utils.weight_norm import WeightNorm

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
        check_weight_norm(model)
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


def check_weight_norm(model: nn.Module) -> None:
    """Refuse a model with weight norm where this torch differentiates it twice wrongly.

    Raises:
        NotImplementedError: the model has weight norm and
            :func:`weight_norm_second_derivative_is_right` is False; the message says how to
            fold the norm into the weights.
    """
    normed = weight_norm_modules(model)
    if normed and not weight_norm_second_derivative_is_right():
        raise NotImplementedError(
            f"weight norm on {', '.join(normed)}: torch {torch.__version__}'s second "
            "derivative of torch._weight_norm is wrong (it fails gradgradcheck), so a "
            "double_backward Hessian would be silently wrong, and forward-mode AD (func, "
            "fused) has no rule for it; fold the norm into the weights first "
            "(torch.nn.utils.remove_weight_norm(module), or "
            "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'))"
        )


def weight_norm_modules(model: nn.Module) -> list[str]:
    """Where ``model`` has weight norm: old-style ``torch.nn.utils.weight_norm`` (a forward
    pre-hook) or the ``parametrizations.weight_norm`` parametrization, as ``module.weight``
    names."""
    found = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                found.append(f"{name or '(the model)'}.{hook.name}")
        groups = getattr(module, "parametrizations", None)
        if isinstance(groups, nn.ModuleDict):
            for attribute, chain in groups.items():
                if any(isinstance(p, _parametrizations._WeightNorm) for p in chain):
                    found.append(f"{name or '(the model)'}.{attribute}")
    return found


@functools.cache
def weight_norm_second_derivative_is_right() -> bool:
    """Whether this torch differentiates ``torch._weight_norm`` twice correctly (checked once,
    on a 3 x 4 float64 problem, by ``gradgradcheck``; torch 2.13's CPU kernel fails it)."""
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(3, 4, dtype=torch.float64, generator=generator).requires_grad_()
    g = torch.randn(3, 1, dtype=torch.float64, generator=generator).requires_grad_()
    try:
        return bool(
            torch.autograd.gradgradcheck(
                lambda v, g: torch._weight_norm(v, g, 0), (v, g), raise_exception=False
            )
        )
    except RuntimeError:
        return False
