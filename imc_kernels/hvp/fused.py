"""The ``fused`` engine: a model walker with one HVP rule per layer type.

Supported: ``nn.Sequential`` (nested allowed) of Linear, Conv2d, ReLU, LeakyReLU, Tanh,
Sigmoid, GELU, SiLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, eval-mode
BatchNorm1d/2d, Dropout (eval) and Identity, under cross-entropy or MSE loss. The rules
compute what those classes' forwards compute and never call the modules, so a model is
refused (and ``engine="auto"`` takes an exact engine) when anything could change that
computation unseen: forward hooks or pre-hooks (on a module or global), a subclass's or an
instance's own ``forward`` (containers included), or parameters other than the class's
``weight`` and ``bias`` (a reparametrized weight).

When the operator is made, the primal forward and backward run once and every rule keeps
what its tangent passes need (inputs, pre-activations, output gradients). A product of a
block of b vectors is then one tangent forward and one tangent backward in which every GEMM
or convolution takes the whole block at once, and the elementwise work around them runs in
fused kernels (Triton on GPU, their pure-PyTorch twins on CPU). Parameters shared between
modules accumulate their products; frozen ones get no tangent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from imc_kernels.hvp._common import ParamLayout, check_targets
from imc_kernels.hvp.layers.activation import (
    ACTIVATION_CLASSES,
    ActivationRule,
    activation_kind,
)
from imc_kernels.hvp.layers.base import LayerRule, Workspace, unsupported
from imc_kernels.hvp.layers.batchnorm import BatchNormRule, batchnorm_unsupported_reason
from imc_kernels.hvp.layers.conv2d import (
    Conv2dRule,
    conv2d_unsupported_reason,
    pool_patch_ratio_limit,
)
from imc_kernels.hvp.layers.flatten import FlattenRule
from imc_kernels.hvp.layers.linear import LinearRule
from imc_kernels.hvp.layers.losses import loss_unsupported_reason, make_loss_rule
from imc_kernels.hvp.layers.pool import AvgPool2dRule, MaxPool2dRule

_SIMPLE_RULES: dict[type, type[LayerRule]] = {
    nn.Linear: LinearRule,
    nn.Flatten: FlattenRule,
    nn.MaxPool2d: MaxPool2dRule,
    nn.AvgPool2d: AvgPool2dRule,
    nn.AdaptiveAvgPool2d: AvgPool2dRule,
    nn.Identity: LayerRule,
    nn.Dropout: LayerRule,
    nn.Dropout1d: LayerRule,
    nn.Dropout2d: LayerRule,
    nn.AlphaDropout: LayerRule,
}


# Classes whose rule also serves their subclasses (when those keep the class's computation,
# see _custom_code_reason); the _SIMPLE_RULES classes take their rule by exact type only.
_RULE_BASES = (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, *ACTIVATION_CLASSES)

# The methods through which a subclass or an instance changes what a rule's class computes:
# Conv2d.forward calls self._conv_forward. (BatchNorm's _check_input_dim only checks.)
_COMPUTING_METHODS: dict[type, tuple[str, ...]] = {nn.Conv2d: ("forward", "_conv_forward")}

# Forward hooks, on one module or on every module (torch.nn.modules.module.
# register_module_forward_hook and its pre-hook twin), change the function whose Hessian is
# taken, and the rules never run the modules' forwards: such models go to an exact engine.
# Backward hooks change no forward value, so the Hessian of the loss is the same with them.
_GLOBAL_HOOKS = {
    "_global_forward_pre_hooks": "forward pre-hooks",
    "_global_forward_hooks": "forward hooks",
}
_MODULE_HOOKS = {"_forward_pre_hooks": "a forward pre-hook", "_forward_hooks": "a forward hook"}


def sequential_parts(
    model: nn.Module, prefix: str = ""
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """``(containers, leaves)`` of a (nested) ``nn.Sequential``, each a list of
    ``(name, module)`` (``""`` names the model): the Sequentials, ``model`` first, and the
    modules they run, in execution order (a module used twice is listed twice).

    Raises:
        ValueError: ``model`` is not a Sequential (the walker follows no other control flow).
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"the fused engine walks nn.Sequential models; {type(model).__name__} has its own "
            "forward (use engine='func')"
        )
    containers, leaves = [(prefix, model)], []
    # _modules, as Sequential.forward iterates: named_children() would drop a repeated module.
    for name, child in model._modules.items():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            inner_containers, inner_leaves = sequential_parts(child, path)
            containers.extend(inner_containers)
            leaves.extend(inner_leaves)
        else:
            leaves.append((path, child))
    return containers, leaves


def leaf_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of a (nested) ``nn.Sequential`` in execution order.

    Raises:
        ValueError: ``model`` is not a Sequential (the walker follows no other control flow).
    """
    return [module for _, module in sequential_parts(model)[1]]


def _rule_class(module: nn.Module) -> type | None:
    """The class whose computation ``module``'s rule reproduces, or None (no rule)."""
    if type(module) in _SIMPLE_RULES:
        return type(module)
    return next((c for c in type(module).__mro__ if c in _RULE_BASES), None)


def _custom_code_reason(module: nn.Module, base: type) -> str | None:
    """Why ``module`` may compute something else than ``base``'s forward, or None.

    A rule reproduces ``base``'s forward and never calls the module: hooks, a subclass's own
    forward or one set on the instance would be skipped silently, so they rule it out.
    """
    hooks = [kind for attr, kind in _MODULE_HOOKS.items() if getattr(module, attr, None)]
    if hooks:
        return f"has {' and '.join(hooks)}, which the fused rules would skip"
    for method in _COMPUTING_METHODS.get(base, ("forward",)):
        if method in vars(module):
            return f"{method} replaced on the instance, the fused rules compute {base.__name__}'s"
        if getattr(type(module), method) is not getattr(base, method):
            return f"overrides {base.__name__}.{method}, the fused rules compute {base.__name__}'s"
    return None


def _parameter_reason(module: nn.Module) -> str | None:
    """Why ``module``'s parameters are not the ones its rule reads, or None.

    Rules read ``module.weight`` and ``module.bias`` and pair their tangents with
    ``module.parameters(recurse=False)`` in that order: a reparametrized weight (old-style
    ``nn.utils.weight_norm``: ``weight_g``, ``weight_v``; ``nn.utils.parametrize``: a
    submodule) would get a wrong or mis-shaped tangent.
    """
    children = list(module._modules)
    if children:
        return f"has submodules {children} (a parametrization?) that the fused rules do not see"
    names = [name for name, _ in module.named_parameters(recurse=False)]
    expected = [name for name in ("weight", "bias") if getattr(module, name, None) is not None]
    if names != expected:
        return (
            f"parameters {names} where the fused rule expects {expected} (a reparametrized "
            "weight, such as the old nn.utils.weight_norm?)"
        )
    return None


def module_unsupported_reason(module: nn.Module) -> str | None:
    """None when the fused engine has a rule for ``module``, else why not."""
    base = _rule_class(module)
    if base is None:
        return unsupported(module, "no fused rule")
    reasons = [r for r in (_custom_code_reason(module, base), _parameter_reason(module)) if r]
    if reasons:
        return unsupported(module, "; ".join(reasons))
    if isinstance(module, nn.Conv2d):
        return conv2d_unsupported_reason(module)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return batchnorm_unsupported_reason(module)
    return None


def container_unsupported_reason(container: nn.Module) -> str | None:
    """None when the walker may stand in for ``container``'s forward (a plain Sequential
    with no hooks and no parameters of its own), else why not."""
    reason = _custom_code_reason(container, nn.Sequential)
    if reason:
        return unsupported(container, reason)
    own = list(container._parameters)
    if own:
        return unsupported(container, f"parameters {own} of its own, used by its own code")
    return None


def global_hooks_reason() -> str | None:
    """Why hooks registered for every module rule the fused engine out, or None."""
    from torch.nn.modules import module as torch_module

    kinds = [kind for attr, kind in _GLOBAL_HOOKS.items() if getattr(torch_module, attr, None)]
    if not kinds:
        return None
    return (
        f"global module {' and '.join(kinds)} (torch.nn.modules.module."
        "register_module_*_hook), which the fused rules would skip"
    )


def fused_unsupported_reason(
    model: nn.Module, loss_fn: Callable, inputs, targets, mode: str, output_shape
) -> str | None:
    """Why the fused engine cannot run this problem; None when it can.

    ``output_shape`` None skips the loss check (:class:`FusedEngine` makes it itself, on the
    output of its own forward).
    """
    if mode != "eval":
        return "mode='train' (the fused engine evaluates Dropout and BatchNorm in eval mode)"
    if not isinstance(inputs, torch.Tensor):
        return "inputs other than a single tensor"
    try:
        containers, leaves = sequential_parts(model)
    except ValueError as exc:
        return str(exc)
    reason = global_hooks_reason()
    if reason:
        return reason
    checks = ((container_unsupported_reason, containers), (module_unsupported_reason, leaves))
    reasons = [
        _located(found, name)
        for check, parts in checks
        for name, module in parts
        if (found := check(module))
    ]
    if reasons:
        return "unsupported modules: " + ", ".join(dict.fromkeys(reasons))
    if output_shape is None:
        return None
    return loss_unsupported_reason(loss_fn, tuple(output_shape), targets)


def _located(reason: str, name: str) -> str:
    """``reason`` (``"Type (why)"``) with where the module sits: ``"Type '0.2' (why)"``."""
    kind, _, why = reason.partition(" ")
    where = f"{name!r}" if name else "(the model)"
    return f"{kind} {where} {why}"


# Monotone non-decreasing activations commute with max pooling: maxpool(act(z)) equals
# act(maxpool(z)) everywhere, and the argmax is the same (for ReLU, windows with no positive
# entry differ only where act' = 0). Pooling first runs the activation's tangent passes on a
# quarter of the elements (2x2 windows): for the CNN of the benchmarks that removes two of the
# largest elementwise passes of every product.
_COMMUTES_WITH_MAXPOOL = ("relu", "tanh", "sigmoid")


def _commutes_with_maxpool(module: nn.Module) -> bool:
    kind = activation_kind(module)
    if kind is None:
        return False
    return kind[0] in _COMMUTES_WITH_MAXPOOL or (kind[0] == "leaky_relu" and kind[1] >= 0)


def commute_activation_maxpool(leaves: list[nn.Module]) -> list[nn.Module]:
    """Reorder every (monotone activation, MaxPool2d) pair to (MaxPool2d, activation)."""
    order = list(leaves)
    for i in range(len(order) - 1):
        if _commutes_with_maxpool(order[i]) and isinstance(order[i + 1], nn.MaxPool2d):
            order[i], order[i + 1] = order[i + 1], order[i]
    return order


def _make_rule(module: nn.Module, curvature: str) -> LayerRule:
    if isinstance(module, nn.Conv2d):
        return Conv2dRule(module, curvature)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return BatchNormRule(module, curvature)
    if activation_kind(module) is not None:
        return ActivationRule(module, curvature)
    return _SIMPLE_RULES[type(module)](module, curvature)


# The two workspace buffers that the rules' backward outputs alternate between.
_BACKWARD = (("backward", 0), ("backward", 1))


class FusedEngine:
    """Hessian or GGN products by per-layer R-op rules on a cached primal."""

    name = "fused"

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        loss_fn: Callable,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        curvature: str,
    ):
        self.layout = layout
        leaves = commute_activation_maxpool(leaf_modules(model))
        self.rules = [_make_rule(m, curvature) for m in leaves]
        # One budget for the kept tangent buffers of every rule (CPU; see Workspace).
        self.workspace = Workspace()
        for rule in self.rules:
            rule.workspace = self.workspace
        slot = {id(p): i for i, p in enumerate(layout.params)}
        # For each rule, the flat-layout slot of each of its parameters (None: frozen).
        self.param_slots = [
            [slot.get(id(p)) if p.requires_grad else None for p in rule.params]
            for rule in self.rules
        ]
        # Slots whose product comes from one rule alone (not a parameter shared by several):
        # only those can be written into the output in place.
        uses = [s for slots in self.param_slots for s in slots if s is not None]
        self.single_rule_slots = {s for s in uses if uses.count(s) == 1}
        has_params = [any(s is not None for s in slots) for slots in self.param_slots]
        # Backward passes stop at the first rule with trainable parameters: nothing before it
        # has a product to receive, and that rule needs no input gradient.
        self.first = has_params.index(True) if any(has_params) else len(self.rules)
        with torch.no_grad():
            h = inputs
            for rule in self.rules:
                h = rule.primal_forward(h)
            check_targets(h, targets, loss_fn)
            reason = loss_unsupported_reason(loss_fn, tuple(h.shape), targets)
            if reason:
                raise ValueError(f"the fused engine does not support {reason}")
            self.loss_rule = make_loss_rule(loss_fn)
            self.loss, g = self.loss_rule.primal(h, targets)
            self.output = h
            for i in range(len(self.rules) - 1, self.first - 1, -1):
                g = self.rules[i].primal_backward(g, i > self.first)
            self._absorb_input_pool(inputs.device)

    def _absorb_input_pool(self, device: torch.device) -> None:
        """Let the first rule with parameters, when it is a convolution followed by max
        pooling, compute the pooled tangents itself (``Conv2dRule.absorb_max_pool``): its input
        tangent is zero (no rule before it has a parameter) and its input gradient unused.
        An activation right after the pool goes in too where it can
        (``Conv2dRule.absorb_activation``)."""
        if self.first + 1 >= len(self.rules):
            return
        conv, pool = self.rules[self.first], self.rules[self.first + 1]
        if not (isinstance(conv, Conv2dRule) and isinstance(pool, MaxPool2dRule)):
            return
        if conv.absorb_max_pool(pool, pool_patch_ratio_limit(device)):
            after = self.rules[self.first + 2] if self.first + 2 < len(self.rules) else None
            if isinstance(after, ActivationRule):
                conv.absorb_activation(after)

    def matmat(
        self,
        tangents: list[torch.Tensor],
        destinations: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Per parameter ``(b, *shape)`` tangents -> per parameter ``(b, *shape)`` products.

        ``destinations`` (``b = 1``): per parameter, a parameter-shaped view of the caller's
        output; rules may write their product there and return that view (the caller then
        skips the copy), which only happens for parameters no other rule contributes to.
        """
        b = tangents[0].shape[0]
        if destinations is not None:
            for rule, slots in zip(self.rules, self.param_slots):
                rule.destinations = [
                    destinations[s] if s in self.single_rule_slots else None for s in slots
                ]
        try:
            return self._matmat(tangents, b)
        finally:
            for rule in self.rules:
                rule.forget_tangents()
                rule.destinations = None

    def _matmat(self, tangents: list[torch.Tensor], b: int) -> list[torch.Tensor]:
        with torch.no_grad():
            r = None
            for rule, slots in zip(self.rules, self.param_slots):
                r = rule.tangent_forward(r, [None if s is None else tangents[s] for s in slots])
            rg = self.loss_rule.tangent(r)
            products: list[torch.Tensor | None] = [None] * len(tangents)
            for i in range(len(self.rules) - 1, self.first - 1, -1):
                # Each backward output goes to the shared buffer its input is not in.
                self.rules[i].backward_key = _BACKWARD[self.workspace.holds(_BACKWARD[0], rg)]
                rg, hv = self.rules[i].tangent_backward(rg, i > self.first)
                for s, piece in zip(self.param_slots[i], hv):
                    if s is None or piece is None:
                        continue
                    products[s] = piece if products[s] is None else products[s] + piece
        return [
            torch.zeros_like(t) if p is None else p.view(b, *t.shape[1:])
            for p, t in zip(products, tangents)
        ]
