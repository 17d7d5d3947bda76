"""Sparse-masked training: fused masked optimizers and masked layers.

The optimizers keep the weights of a pruned network exactly sparse with one fused step per
param group (:func:`imc_kernels.ops.masked_sgd_step`, :func:`imc_kernels.ops.masked_adam_step`):

* at construction each param group is packed into one flat fp32 buffer: every parameter's
  ``.data`` becomes a view of it, every ``.grad`` a view of a flat gradient buffer (autograd
  accumulates into an existing ``.grad`` in place), and the masks become one flat bool mask;
  pruned weights are set to 0;
* each ``step()`` is ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` after ``p.grad.mul_(mask)``,
  followed by ``p.data.mul_(mask)``, within fp32 rounding, and the optimizer state is exactly 0
  on pruned entries. The state dict has ``torch.optim``'s layout (per-parameter
  ``momentum_buffer``, or ``step``/``exp_avg``/``exp_avg_sq``).

Masks are bool tensors of the parameter's shape, True = kept (the mask dicts of
``imc_prune.masks``). The layers :class:`MaskedLinear` and :class:`MaskedConv2d` multiply the
weight by a ``mask`` buffer in the forward (a dense product), so pruned weights get zero
gradient whatever their value; :func:`mask_model` swaps them into a model in place.

Example:
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> masks = {"0.weight": torch.rand(3, 4) > 0.5}
    >>> opt = MaskedAdam.from_model(model, masks, lr=1e-3)
    >>> model(torch.randn(8, 4)).square().mean().backward()
    >>> opt.step()
    >>> bool((model[0].weight[~masks["0.weight"]] == 0).all())
    True
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imc_kernels import ops

__all__ = [
    "MaskedAdam",
    "MaskedAdamW",
    "MaskedConv2d",
    "MaskedLinear",
    "MaskedSGD",
    "mask_model",
]

# Group flags of torch.optim that the fused step does not implement: loading a torch.optim
# state dict that sets one of them must fail rather than be silently ignored.
_UNSUPPORTED_FLAGS = ("maximize", "amsgrad", "capturable", "differentiable", "fused")


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


class _FlatGroup:
    """The flat buffers of one param group and each parameter's views into them."""

    def __init__(
        self,
        params: list[torch.Tensor],
        masks: list[torch.Tensor | None],
        names: list[str],
        owner: str,
    ) -> None:
        self.params = params
        self.names = names
        self.owner = owner
        device = params[0].device if params else torch.device("cpu")
        for p, name in zip(params, names):
            if p.layout != torch.strided:
                raise TypeError(
                    f"{owner} supports dense (strided) parameters only; {name} is {p.layout}"
                )
            if p.dtype != torch.float32:
                raise TypeError(
                    f"{owner} supports float32 parameters only (the fused step updates one fp32 "
                    f"buffer); {name} is {p.dtype}"
                )
            if p.device != device:
                raise ValueError(
                    f"{owner}: the parameters of one param group must share a device; {name} is "
                    f"on {p.device} but {names[0]} on {device} (use one param group per device)"
                )
        bounds = [0]
        for p in params:
            bounds.append(bounds[-1] + p.numel())
        self.bounds = bounds
        total = bounds[-1]
        self.param = torch.empty(total, dtype=torch.float32, device=device)
        self.grad = torch.zeros(total, dtype=torch.float32, device=device)
        self.param_views = []
        self.grad_views = []
        for i, p in enumerate(params):
            start, end = bounds[i], bounds[i + 1]
            view = self.param[start:end].view(p.shape)
            view.copy_(p.detach())
            p.data = view
            grad_view = self.grad[start:end].view(p.shape)
            if p.grad is not None:
                grad_view.copy_(p.grad)
            if p.requires_grad or p.grad is not None:
                p.grad = grad_view
            self.param_views.append(view)
            self.grad_views.append(grad_view)
        self.mask = None
        self.pruned = None
        if any(mask is not None for mask in masks):
            self.mask = torch.ones(total, dtype=torch.bool, device=device)
            for i, mask in enumerate(masks):
                if mask is not None:
                    self.mask[bounds[i] : bounds[i + 1]].copy_(mask.reshape(-1))
            self.pruned = ~self.mask
            self.apply_mask()
        self.state: dict[str, torch.Tensor] = {}
        self.state_views: dict[str, list[torch.Tensor]] = {}

    def apply_mask(self) -> None:
        if self.pruned is not None:
            self.param.masked_fill_(self.pruned, 0.0)

    def state_buffer(self, key: str) -> torch.Tensor:
        """The flat state buffer ``key``, allocated as zeros on first use."""
        if key not in self.state:
            flat = torch.zeros_like(self.param)
            self.state[key] = flat
            self.state_views[key] = [
                flat[self.bounds[i] : self.bounds[i + 1]].view(p.shape)
                for i, p in enumerate(self.params)
            ]
        return self.state[key]

    def check_storage(self) -> None:
        for p, view, name in zip(self.params, self.param_views, self.names):
            if p.data_ptr() != view.data_ptr() or p.shape != view.shape:
                raise RuntimeError(
                    f"{self.owner}: {name} no longer lives in the optimizer's flat buffer (its "
                    ".data was replaced, e.g. by module.to() or vector_to_parameters); create "
                    "the optimizer after moving the model, and copy values in with "
                    "param.data.copy_() or model.load_state_dict()"
                )

    def collect_grads(self) -> list[bool]:
        """Copy gradients set by the user into the flat buffer; which parameters have one."""
        active = []
        for p, grad_view, name in zip(self.params, self.grad_views, self.names):
            grad = p.grad
            if grad is None:
                # torch.optim skips a parameter without a gradient: no update, no state change.
                active.append(False)
                continue
            if grad is not grad_view:
                if grad.layout != torch.strided:
                    raise RuntimeError(f"{self.owner} does not support sparse gradients ({name})")
                if grad.shape != p.shape:
                    raise RuntimeError(
                        f"{self.owner}: the gradient of {name} has shape {tuple(grad.shape)}, "
                        f"the parameter {tuple(p.shape)}"
                    )
                grad_view.copy_(grad)
                p.grad = grad_view
            active.append(True)
        return active

    def zero_grad(self) -> None:
        self.grad.zero_()
        for p, grad_view in zip(self.params, self.grad_views):
            if p.grad is not grad_view and (p.requires_grad or p.grad is not None):
                p.grad = grad_view

    def runs(self, active: list[bool], keys: list[Any]) -> list[tuple[int, int]]:
        """Maximal ranges ``[i, j)`` of consecutive active parameters with equal keys."""
        runs = []
        i, n = 0, len(self.params)
        while i < n:
            if not active[i]:
                i += 1
                continue
            j = i + 1
            while j < n and active[j] and keys[j] == keys[i]:
                j += 1
            runs.append((i, j))
            i = j
        return runs

    def slices(self, run: tuple[int, int]) -> slice:
        return slice(self.bounds[run[0]], self.bounds[run[1]])


class _MaskedOptimizer(torch.optim.Optimizer):
    """Shared packing, gradient handling and state-dict logic of the masked optimizers."""

    _state_keys: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        masks: Sequence[torch.Tensor | None] | None,
        defaults: dict[str, Any],
        param_names: Sequence[str] | None,
    ) -> None:
        owner = type(self).__name__
        if isinstance(params, torch.Tensor):
            raise TypeError(
                f"{owner}: params must be an iterable of tensors or dicts, got a single tensor"
            )
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = []
            for group in params:
                group = dict(group)
                group_params = group["params"]
                if isinstance(group_params, torch.Tensor):
                    group_params = [group_params]
                group["params"] = list(group_params)
                groups.append(group)
        else:
            groups = [{"params": params}]
        flat = [p for group in groups for p in group["params"]]
        for i, p in enumerate(flat):
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"{owner}: params must be tensors (or dicts of them), got "
                    f"{type(p).__name__} at position {i}; for named parameters use from_model"
                )
        if param_names is None:
            names = [f"parameter {i}" for i in range(len(flat))]
        else:
            names = list(param_names)
            if len(names) != len(flat):
                raise ValueError(f"{owner}: {len(names)} param_names for {len(flat)} parameters")
        if masks is None:
            mask_list: list[torch.Tensor | None] = [None] * len(flat)
        elif isinstance(masks, Mapping):
            raise TypeError(
                f"{owner}: masks must be a sequence aligned with params; for a dict "
                "name -> mask use from_model(model, masks, ...)"
            )
        else:
            mask_list = list(masks)
            if len(mask_list) != len(flat):
                raise ValueError(
                    f"{owner}: got {len(mask_list)} masks for {len(flat)} parameters; pass one "
                    "mask (or None) per parameter, in order"
                )
        for p, mask, name in zip(flat, mask_list, names):
            _check_mask(mask, p, name, owner)
        self._packs: list[_FlatGroup] = []
        self._pending = {id(p): (mask, name) for p, mask, name in zip(flat, mask_list, names)}
        super().__init__(groups, defaults)
        self._pending = {}

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        masks: Mapping[str, torch.Tensor] | None = None,
        **hyperparameters: Any,
    ):
        """The optimizer over ``model``'s trainable parameters with a name -> mask dict.

        Args:
            model: the network; every parameter with ``requires_grad`` is optimized.
            masks: bool masks keyed by ``model.named_parameters()`` names (True = kept);
                parameters without an entry are not masked. None for no masks.
            **hyperparameters: the optimizer's keyword arguments (``lr``, ...).

        Returns:
            The optimizer, with pruned weights of ``model`` set to 0.

        Raises:
            ValueError: a mask names no trainable parameter of ``model``, or the model has
                none.
            TypeError: see the constructor.

        Example:
            >>> model = nn.Linear(4, 2)
            >>> opt = MaskedSGD.from_model(model, {"weight": torch.eye(2, 4, dtype=torch.bool)},
            ...                            lr=0.1)
        """
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{cls.__name__}.from_model: the model has no trainable parameters")
        masks = {} if masks is None else dict(masks)
        trainable = {name for name, _ in named}
        unknown = sorted(set(masks) - trainable)
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_model: masks for {unknown[:5]} match no trainable "
                f"parameter of the model (it has {sorted(trainable)[:8]}...)"
            )
        return cls(
            [p for _, p in named],
            [masks.get(name) for name, _ in named],
            param_names=[name for name, _ in named],
            **hyperparameters,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as ``torch.optim.Optimizer`` does, and pack it into flat buffers.

        Groups added after construction are unmasked.

        Raises:
            ValueError: a parameter appears twice in the group (it could not be packed).
        """
        listed = param_group.get("params")
        # Checked before torch's own check, which only warns about a repeated parameter (a
        # single tensor cannot repeat; torch rejects sets and a missing list itself).
        if listed is not None and not isinstance(listed, (torch.Tensor, set)):
            listed = list(listed)  # a generator is read once, here
            if len({id(p) for p in listed}) != len(listed):
                raise ValueError(f"{type(self).__name__}: a parameter appears twice in one group")
            param_group = {**param_group, "params": listed}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params = group["params"]
        pending = getattr(self, "_pending", {})
        offset = sum(len(g["params"]) for g in self.param_groups[:-1])
        masks, names = [], []
        for i, p in enumerate(params):
            mask, name = pending.get(id(p), (None, f"parameter {offset + i}"))
            masks.append(mask)
            names.append(name)
        self._packs.append(_FlatGroup(params, masks, names, type(self).__name__))

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set the pruned weights to 0 again (after copying dense weights in, e.g. a rewind).

        Example:
            >>> model = nn.Linear(3, 1)
            >>> opt = MaskedSGD.from_model(model, {"weight": torch.tensor([[True, False, True]])},
            ...                            lr=0.1)
            >>> model.load_state_dict({"weight": torch.ones(1, 3), "bias": torch.zeros(1)})
            <All keys matched successfully>
            >>> opt.apply_masks()
            >>> model.weight
            Parameter containing:
            tensor([[1., 0., 1.]], requires_grad=True)
        """
        for pack in self._packs:
            pack.apply_mask()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers, keeping each ``p.grad`` a view of them.

        Args:
            set_to_none: accepted for compatibility and ignored: the fused step reads the flat
                gradient buffer, so gradients are zeroed, never dropped. A parameter that then
                receives no gradient is stepped with a zero gradient, as ``torch.optim`` does
                after ``zero_grad(set_to_none=False)``.
        """
        del set_to_none
        for pack in self._packs:
            pack.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        """One fused masked step per param group (one launch per run of parameters).

        A parameter whose ``.grad`` is None is skipped, as in ``torch.optim``; a ``.grad`` set
        to a new tensor is copied into the flat gradient buffer first.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: a parameter was moved out of the flat buffer, or a sparse gradient.
            ValueError: invalid hyperparameters in a param group.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, pack in zip(self.param_groups, self._packs):
            if not pack.params:
                continue
            for flag in _UNSUPPORTED_FLAGS:
                if group.get(flag):
                    raise ValueError(f"{type(self).__name__} does not support {flag}=True")
            pack.check_storage()
            active = pack.collect_grads()
            self._step_group(group, pack, active)
        return loss

    def _step_group(self, group: dict[str, Any], pack: _FlatGroup, active: list[bool]) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the matching ``torch.optim`` optimizer.

        The loaded state is copied into the flat state buffers and zeroed on pruned entries.

        Args:
            state_dict: from :meth:`state_dict` (of this class, or of ``torch.optim.SGD`` /
                ``Adam`` / ``AdamW`` over the same parameters).

        Raises:
            ValueError: group structure or state shapes do not match the parameters.
        """
        super().load_state_dict(state_dict)
        for pack in self._packs:
            self._adopt_state(pack)

    @torch.no_grad()
    def _adopt_state(self, pack: _FlatGroup) -> None:
        for key in self._state_keys:
            loaded = []
            for p, name in zip(pack.params, pack.names):
                value = self.state[p].get(key) if p in self.state else None
                if value is not None and tuple(value.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{type(self).__name__}: state {key!r} of {name} has shape "
                        f"{tuple(value.shape)}, the parameter {tuple(p.shape)}"
                    )
                loaded.append(value)
            if all(value is None for value in loaded) and key not in pack.state:
                continue
            flat = pack.state_buffer(key)
            for i, (p, value) in enumerate(zip(pack.params, loaded)):
                view = pack.state_views[key][i]
                if value is None:
                    view.zero_()
                    if p in self.state:
                        self.state[p].pop(key, None)
                    continue
                if value is not view:
                    view.copy_(value)
                self.state[p][key] = view
            if pack.pruned is not None:
                flat.masked_fill_(pack.pruned, 0.0)
        for p in pack.params:
            # torch's load keeps the saved step tensors themselves; two optimizers must not
            # share (and both increment) one.
            if p in self.state and isinstance(self.state[p].get("step"), torch.Tensor):
                self.state[p]["step"] = self.state[p]["step"].detach().clone()


def _check_mask(mask: Any, param: torch.Tensor, name: str, owner: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{owner}: the mask of {name} must be a bool tensor or None, got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{owner}: the mask of {name} must be a bool tensor (True = kept), got {mask.dtype}"
        )
    if mask.shape != param.shape:
        raise ValueError(
            f"{owner}: the mask of {name} has shape {tuple(mask.shape)} but the parameter has "
            f"shape {tuple(param.shape)}"
        )


def _check_real(value: Any, what: str) -> None:
    """A real number (or a one-element tensor holding one), not a string or a bool."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r}")


def _check_common_hyperparameters(lr: Any, weight_decay: Any) -> None:
    _check_real(lr, "lr")
    _check_real(weight_decay, "weight_decay")
    if not _scalar(lr) >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")


class MaskedSGD(_MaskedOptimizer):
    """``torch.optim.SGD`` with masked weights, one fused step per param group.

    Each step equals ``torch.optim.SGD`` after ``p.grad.mul_(mask)``, followed by
    ``p.data.mul_(mask)``, within fp32 rounding; pruned weights and momentum stay exactly 0.

    Args:
        params: iterable of float32 tensors, or of param-group dicts.
        masks: None, or one bool mask (True = kept, the parameter's shape) or None per
            parameter, in the order of ``params`` (groups flattened).
        lr: learning rate.
        momentum: momentum factor.
        dampening: dampening for momentum.
        weight_decay: L2 penalty.
        nesterov: Nesterov momentum.
        param_names: names of the parameters, for error messages.

    Raises:
        ValueError: invalid hyperparameters, masks of the wrong shape or count.
        TypeError: non-float32 parameters or non-bool masks.

    Example:
        >>> w = nn.Parameter(torch.ones(2, 2))
        >>> opt = MaskedSGD([w], [torch.eye(2, dtype=torch.bool)], lr=0.1, momentum=0.9)
        >>> _ = w.grad.fill_(1.0)  # w.grad is a view of the flat gradient buffer
        >>> opt.step()
        >>> w.data
        tensor([[0.9000, 0.0000],
                [0.0000, 0.9000]])
    """

    _state_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        masks: Sequence[torch.Tensor | None] | None = None,
        *,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        param_names: Sequence[str] | None = None,
    ) -> None:
        _check_common_hyperparameters(lr, weight_decay)
        _check_real(momentum, "momentum")
        _check_real(dampening, "dampening")
        if not momentum >= 0.0:
            raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
        )
        super().__init__(params, masks, defaults, param_names)

    def _step_group(self, group: dict[str, Any], pack: _FlatGroup, active: list[bool]) -> None:
        momentum = _scalar(group["momentum"])
        has_buffer = [p in self.state and "momentum_buffer" in self.state[p] for p in pack.params]
        buffer = pack.state_buffer("momentum_buffer") if momentum != 0 else None
        for run in pack.runs(active, has_buffer):
            span = pack.slices(run)
            ops.masked_sgd_step(
                pack.param[span],
                pack.grad[span],
                None if pack.mask is None else pack.mask[span],
                None if buffer is None else buffer[span],
                lr=_scalar(group["lr"]),
                momentum=momentum,
                dampening=_scalar(group["dampening"]),
                weight_decay=_scalar(group["weight_decay"]),
                nesterov=group["nesterov"],
                first_step=not has_buffer[run[0]],
            )
            if buffer is not None:
                for i in range(*run):
                    self.state[pack.params[i]]["momentum_buffer"] = pack.state_views[
                        "momentum_buffer"
                    ][i]


class MaskedAdam(_MaskedOptimizer):
    """``torch.optim.Adam`` with masked weights, one fused step per param group.

    Each step equals ``torch.optim.Adam`` after ``p.grad.mul_(mask)``, followed by
    ``p.data.mul_(mask)``, within fp32 rounding; pruned weights and both moments stay
    exactly 0. ``amsgrad`` and ``maximize`` are not supported.

    Args:
        params: iterable of float32 tensors, or of param-group dicts.
        masks: None, or one bool mask (True = kept, the parameter's shape) or None per
            parameter, in the order of ``params`` (groups flattened).
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: term added to the denominator.
        weight_decay: L2 penalty (decoupled for :class:`MaskedAdamW`).
        param_names: names of the parameters, for error messages.

    Raises:
        ValueError: invalid hyperparameters, masks of the wrong shape or count.
        TypeError: non-float32 parameters or non-bool masks.

    Example:
        >>> w = nn.Parameter(torch.ones(3))
        >>> opt = MaskedAdam([w], [torch.tensor([True, False, True])], lr=0.1)
        >>> _ = w.grad.fill_(2.0)
        >>> opt.step()
        >>> w.data
        tensor([0.9000, 0.0000, 0.9000])
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _decoupled_weight_decay = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        masks: Sequence[torch.Tensor | None] | None = None,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        param_names: Sequence[str] | None = None,
    ) -> None:
        _check_common_hyperparameters(lr, weight_decay)
        _check_real(eps, "eps")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
        if isinstance(betas, (str, bytes)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for index, beta in enumerate(betas):
            _check_real(beta, f"betas[{index}]")
            if not 0.0 <= _scalar(beta) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=self._decoupled_weight_decay,
        )
        super().__init__(params, masks, defaults, param_names)

    def _step_group(self, group: dict[str, Any], pack: _FlatGroup, active: list[bool]) -> None:
        steps = [
            int(self.state[p]["step"]) if p in self.state and "step" in self.state[p] else 0
            for p in pack.params
        ]
        exp_avg = pack.state_buffer("exp_avg")
        exp_avg_sq = pack.state_buffer("exp_avg_sq")
        beta1, beta2 = group["betas"]
        for run in pack.runs(active, steps):
            span = pack.slices(run)
            ops.masked_adam_step(
                pack.param[span],
                pack.grad[span],
                None if pack.mask is None else pack.mask[span],
                exp_avg[span],
                exp_avg_sq[span],
                step=steps[run[0]] + 1,
                lr=_scalar(group["lr"]),
                betas=(_scalar(beta1), _scalar(beta2)),
                eps=group["eps"],
                weight_decay=_scalar(group["weight_decay"]),
                decoupled_weight_decay=group.get(
                    "decoupled_weight_decay", self._decoupled_weight_decay
                ),
            )
            for i in range(*run):
                state = self.state[pack.params[i]]
                if "step" not in state:
                    # torch.optim.Adam's layout: a float32 CPU step tensor per parameter.
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["step"] += 1
                state["exp_avg"] = pack.state_views["exp_avg"][i]
                state["exp_avg_sq"] = pack.state_views["exp_avg_sq"][i]


class MaskedAdamW(MaskedAdam):
    """``torch.optim.AdamW`` (decoupled weight decay) with masked weights, fused.

    Each step equals ``torch.optim.AdamW`` after ``p.grad.mul_(mask)``, followed by
    ``p.data.mul_(mask)``, within fp32 rounding. Arguments as :class:`MaskedAdam`, with
    ``weight_decay`` defaulting to 1e-2 as in ``torch.optim.AdamW``.

    Example:
        >>> w = nn.Parameter(torch.ones(2))
        >>> opt = MaskedAdamW([w], [torch.tensor([True, False])], lr=0.1, weight_decay=0.5)
    """

    _decoupled_weight_decay = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        masks: Sequence[torch.Tensor | None] | None = None,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        param_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            params,
            masks,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            param_names=param_names,
        )


# --- Masked layers ---------------------------------------------------------------------------


def _layer_mask(mask: Any, weight: torch.Tensor, owner: str) -> torch.Tensor:
    """A bool copy of ``mask`` on the weight's device (all True for None), after checks."""
    if mask is None:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{owner}: mask must be a bool tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{owner}: mask must be a bool tensor (True = kept), got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(
            f"{owner}: mask has shape {tuple(mask.shape)} but the weight has shape "
            f"{tuple(weight.shape)}"
        )
    return mask.detach().to(device=weight.device, copy=True)


def _check_dense(cls: type, dense: nn.Module, dense_type: type) -> None:
    """``cls.from_dense`` takes a ``dense_type`` layer; a clear TypeError otherwise."""
    if not isinstance(dense, dense_type):
        raise TypeError(
            f"{cls.__name__}.from_dense needs an nn.{dense_type.__name__}, "
            f"got {type(dense).__name__}"
        )


def _adopt_dense(layer: nn.Module, dense: nn.Module, mask: torch.Tensor | None) -> nn.Module:
    """Give ``layer`` (built on the meta device) ``dense``'s own weight and bias parameters,
    its train/eval mode and ``mask``.

    Nothing is allocated or initialised twice, and optimizers holding the dense parameters
    keep working.
    """
    layer.weight = dense.weight
    layer.bias = dense.bias
    layer.set_mask(mask)
    layer.train(dense.training)
    return layer


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose forward uses ``weight * mask`` (a dense product).

    The bool buffer ``mask`` (the weight's shape, True = kept) is saved in the state dict.
    Pruned weights do not affect the output and receive zero gradient, whatever their value.

    Args:
        in_features: as ``nn.Linear``.
        out_features: as ``nn.Linear``.
        bias: as ``nn.Linear``.
        device: as ``nn.Linear``.
        dtype: as ``nn.Linear``.
        mask: bool ``(out_features, in_features)`` mask; None keeps everything.

    Raises:
        TypeError: a mask that is not a bool tensor.
        ValueError: a mask of the wrong shape.

    Example:
        >>> layer = MaskedLinear(3, 2, mask=torch.tensor([[True, False, True]] * 2))
        >>> layer(torch.randn(5, 3)).shape
        torch.Size([5, 2])
    """

    mask: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("mask", _layer_mask(mask, self.weight, type(self).__name__))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight * self.mask, self.bias)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Replace the mask (None: keep everything). Raises as the constructor."""
        self.mask = _layer_mask(mask, self.weight, type(self).__name__)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> MaskedLinear:
        """A masked layer sharing ``linear``'s weight and bias parameters.

        Args:
            linear: the dense layer.
            mask: bool mask of the weight's shape; None keeps everything.

        Returns:
            The masked layer (the weight values are not changed).

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``, or a non-bool mask.
            ValueError: a mask of the wrong shape.

        Example:
            >>> dense = nn.Linear(4, 2)
            >>> MaskedLinear.from_dense(dense).weight is dense.weight
            True
        """
        _check_dense(cls, linear, nn.Linear)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
        )
        return _adopt_dense(layer, linear, mask)


class MaskedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``weight * mask`` (a dense convolution).

    The bool buffer ``mask`` (the weight's shape, True = kept) is saved in the state dict.
    Pruned weights do not affect the output and receive zero gradient, whatever their value.

    Args:
        in_channels: as ``nn.Conv2d``.
        out_channels: as ``nn.Conv2d``.
        kernel_size: as ``nn.Conv2d``.
        stride: as ``nn.Conv2d``.
        padding: as ``nn.Conv2d``.
        dilation: as ``nn.Conv2d``.
        groups: as ``nn.Conv2d``.
        bias: as ``nn.Conv2d``.
        padding_mode: as ``nn.Conv2d``.
        device: as ``nn.Conv2d``.
        dtype: as ``nn.Conv2d``.
        mask: bool mask of the weight's shape; None keeps everything.

    Raises:
        TypeError: a mask that is not a bool tensor.
        ValueError: a mask of the wrong shape.

    Example:
        >>> conv = MaskedConv2d(1, 2, 3, padding=1)
        >>> conv(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 2, 8, 8])
    """

    mask: torch.Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.register_buffer("mask", _layer_mask(mask, self.weight, type(self).__name__))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight * self.mask, self.bias)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Replace the mask (None: keep everything). Raises as the constructor."""
        self.mask = _layer_mask(mask, self.weight, type(self).__name__)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None) -> MaskedConv2d:
        """A masked layer sharing ``conv``'s weight and bias parameters.

        Args:
            conv: the dense layer.
            mask: bool mask of the weight's shape; None keeps everything.

        Returns:
            The masked layer (the weight values are not changed).

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``, or a non-bool mask.
            ValueError: a mask of the wrong shape.

        Example:
            >>> dense = nn.Conv2d(3, 8, 3)
            >>> MaskedConv2d.from_dense(dense).weight is dense.weight
            True
        """
        _check_dense(cls, conv, nn.Conv2d)
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
            dtype=conv.weight.dtype,
        )
        return _adopt_dense(layer, conv, mask)


_MASKED_TYPES: dict[type, type] = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}


def mask_model(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Swap the masked ``nn.Linear``/``nn.Conv2d`` layers of ``model`` for masked ones, in place.

    Parameter names stay the same (``<prefix>.weight``); the new layers share the old
    parameters. A layer that is already a :class:`MaskedLinear`/:class:`MaskedConv2d` gets
    its mask replaced. Weight values are not changed (the masked forward ignores pruned ones).

    Args:
        model: the network.
        masks: bool masks keyed by weight names (``"<prefix>.weight"``), True = kept.

    Returns:
        ``model``, or the new layer when ``model`` itself is a masked ``"weight"``.

    Raises:
        ValueError: a key is not the weight of a module, or names a module that is not an
            exact ``nn.Linear``/``nn.Conv2d`` (a subclass may read its weight elsewhere).
        TypeError: ``masks`` is not a mapping, or a mask is not a bool tensor.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> model = mask_model(model, {"0.weight": torch.rand(3, 4) > 0.5})
        >>> type(model[0]).__name__, [name for name, _ in model.named_parameters()][:2]
        ('MaskedLinear', ['0.weight', '0.bias'])
    """
    if not isinstance(masks, Mapping):
        raise TypeError(
            f"mask_model: masks must be a dict of weight name -> bool mask, got "
            f"{type(masks).__name__}"
        )
    for key, mask in masks.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf != "weight":
            raise ValueError(f"mask_model: {key!r} is not a weight name ('<module>.weight')")
        try:
            module = model.get_submodule(prefix)
        except AttributeError as exc:
            raise ValueError(f"mask_model: {key!r} names no module of the model") from exc
        if isinstance(module, (MaskedLinear, MaskedConv2d)):
            module.set_mask(mask)
            continue
        masked_type = _MASKED_TYPES.get(type(module))
        if masked_type is None:
            raise ValueError(
                f"mask_model: {key!r} belongs to a {type(module).__name__}; only nn.Linear and "
                "nn.Conv2d can be masked"
            )
        masked = masked_type.from_dense(module, mask)
        if not prefix:
            model = masked
            continue
        parent_name, _, child_name = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, masked)
    return model
