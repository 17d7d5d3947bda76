"""Pure-PyTorch twin of ``imc_kernels/ops/masked_optim.py``: the masked optimizer step.

One call updates one flat fp32 buffer holding many parameters (the packing is done by
:mod:`imc_kernels.masked`). For each element with ``keep = mask != 0``:

* SGD, as ``torch.optim.SGD``: ``d = g + wd p``; with momentum ``buf = d`` on the first step,
  else ``buf = mu buf + (1 - dampening) d``; ``d = d + mu buf`` (Nesterov) or ``d = buf``;
  ``p = p - lr d``.
* Adam, as ``torch.optim.Adam`` (``AdamW`` with ``decoupled_weight_decay``): ``p = p (1 - lr wd)``
  (decoupled) or ``g = g + wd p`` (L2); ``m = lerp(m, g, 1 - b1)``;
  ``v = b2 v + (1 - b2) g^2``; ``p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

with ``g`` the gradient where ``keep`` and 0 elsewhere; parameters and optimizer state are
written as exactly 0 where ``keep`` is false. On kept entries this is ``torch.optim`` after
``p.grad.mul_(mask)``; the ops are ATen's in torch's order (its single-tensor path), so on CPU
the twin reproduces ``torch.optim`` bit for bit there. Pruned entries are selected, not
multiplied: a NaN or inf gradient on a pruned entry (``0 * inf = NaN``) cannot reach the weights
or the state.
"""

from __future__ import annotations

import math

import torch

MASK_DTYPES = (torch.bool, torch.uint8)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_buffer(name: str, tensor: object, like: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.float32:
        raise TypeError(
            f"{name} must be float32 (the masked optimizer step is fp32), got {tensor.dtype}"
        )
    if tensor.numel() != like.numel():
        raise ValueError(
            f"{name} has {tensor.numel()} elements but param has {like.numel()}; all buffers of "
            "one step must cover the same parameters"
        )
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device} but param is on {like.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (a flat buffer or a slice of one)")


def _check_common(
    param: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    lr: float,
    weight_decay: float,
) -> None:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param must be a tensor, got {type(param).__name__}")
    if param.dtype != torch.float32:
        raise TypeError(
            f"param must be float32 (the masked optimizer step is fp32), got {param.dtype}"
        )
    if not param.is_contiguous():
        raise ValueError("param must be contiguous (a flat buffer or a slice of one)")
    _check_buffer("grad", grad, param)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
        if mask.dtype not in MASK_DTYPES:
            raise TypeError(f"mask must be bool or uint8 (nonzero = kept), got {mask.dtype}")
        if mask.numel() != param.numel():
            raise ValueError(f"mask has {mask.numel()} elements but param has {param.numel()}")
        if mask.device != param.device:
            raise ValueError(f"mask is on {mask.device} but param is on {param.device}")
        if not mask.is_contiguous():
            raise ValueError("mask must be contiguous")
    # `not x >= 0` also rejects NaN.
    if not _is_number(lr) or not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a number >= 0)")
    if not _is_number(weight_decay) or not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (must be >= 0)")


def _check_out(name: str, out: torch.Tensor | None, param: torch.Tensor) -> None:
    if out is not None:
        _check_buffer(name, out, param)


def check_sgd_inputs(
    param: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first_step: bool,
    out_param: torch.Tensor | None = None,
    out_momentum_buffer: torch.Tensor | None = None,
) -> None:
    """Validate the inputs of :func:`masked_sgd_step` (shared by the twin and the launcher).

    Raises:
        TypeError: a buffer that is not a float32 tensor, or a mask that is not bool/uint8.
        ValueError: buffers of different sizes or devices, non-contiguous buffers, a missing
            momentum buffer, or invalid hyperparameters (``lr < 0``, ``momentum < 0``,
            ``weight_decay < 0``, Nesterov without momentum or with dampening).
    """
    _check_common(param, grad, mask, lr, weight_decay)
    if not _is_number(momentum) or not momentum >= 0.0:
        raise ValueError(f"Invalid momentum value: {momentum!r} (must be >= 0)")
    if not _is_number(dampening) or not math.isfinite(dampening):
        raise ValueError(f"Invalid dampening value: {dampening!r}")
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    _check_out("out_param", out_param, param)
    if momentum != 0.0:
        if momentum_buffer is None:
            raise ValueError(
                "momentum != 0 needs a momentum_buffer (its contents are ignored when "
                "first_step=True)"
            )
        _check_buffer("momentum_buffer", momentum_buffer, param)
        _check_out("out_momentum_buffer", out_momentum_buffer, param)


def check_adam_inputs(
    param: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    out_param: torch.Tensor | None = None,
    out_exp_avg: torch.Tensor | None = None,
    out_exp_avg_sq: torch.Tensor | None = None,
) -> None:
    """Validate the inputs of :func:`masked_adam_step` (shared by the twin and the launcher).

    Raises:
        TypeError: a buffer that is not a float32 tensor, or a mask that is not bool/uint8.
        ValueError: buffers of different sizes or devices, non-contiguous buffers, or invalid
            hyperparameters (``step < 1``, ``lr < 0``, betas outside ``[0, 1)``, ``eps < 0``,
            ``weight_decay < 0``).
    """
    _check_common(param, grad, mask, lr, weight_decay)
    _check_buffer("exp_avg", exp_avg, param)
    _check_buffer("exp_avg_sq", exp_avg_sq, param)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the count after this update), got {step!r}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        if not _is_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {index}: {beta!r} (must be in [0, 1))"
            )
    if not _is_number(eps) or not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps!r} (must be >= 0)")
    _check_out("out_param", out_param, param)
    _check_out("out_exp_avg", out_exp_avg, param)
    _check_out("out_exp_avg_sq", out_exp_avg_sq, param)


def adam_bias_correction(step: int, lr: float, betas: tuple[float, float]) -> tuple[float, float]:
    """Adam's step size and second-moment correction, in float64 as ``torch.optim.Adam``.

    Args:
        step: the step count after this update (1 on the first step).
        lr: learning rate.
        betas: ``(beta1, beta2)``.

    Returns:
        ``(lr / (1 - beta1**step), sqrt(1 - beta2**step))``.

    Example:
        >>> round(adam_bias_correction(1, 1e-3, (0.9, 0.999))[0], 12)  # lr / (1 - 0.9)
        0.01
    """
    beta1, beta2 = betas
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return lr / bias_correction1, bias_correction2**0.5


def masked_sgd_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool = False,
    out_param: torch.Tensor | None = None,
    out_momentum_buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference of :func:`imc_kernels.ops.masked_sgd_step`.

    Args:
        param: contiguous float32 parameters (any shape, read flat); updated in place unless
            ``out_param`` is given.
        grad: their gradient, same size.
        mask: bool or uint8, nonzero = kept; None for no mask.
        momentum_buffer: the momentum state (needed when ``momentum != 0``), updated in place
            unless ``out_momentum_buffer`` is given.
        lr: learning rate.
        momentum: momentum factor.
        dampening: dampening of the momentum.
        weight_decay: L2 penalty.
        nesterov: Nesterov momentum.
        first_step: the buffer holds no state yet: set it to the update direction, as
            ``torch.optim.SGD`` does when a parameter has no momentum buffer.
        out_param: optional buffer for the new parameters.
        out_momentum_buffer: optional buffer for the new momentum state.

    Returns:
        ``(param, momentum_buffer or None)``: the buffers written.

    Raises:
        TypeError: see :func:`check_sgd_inputs`.
        ValueError: see :func:`check_sgd_inputs`.

    Example:
        >>> p, g = torch.ones(4), torch.ones(4)
        >>> masked_sgd_step(p, g, torch.tensor([1, 0, 1, 0], dtype=torch.bool), None, lr=0.5)[0]
        tensor([0.5000, 0.0000, 0.5000, 0.0000])
    """
    check_sgd_inputs(
        param,
        grad,
        mask,
        momentum_buffer,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        first_step=first_step,
        out_param=out_param,
        out_momentum_buffer=out_momentum_buffer,
    )
    param_flat, grad_flat = param.view(-1), grad.view(-1)
    new_param = param_flat if out_param is None else out_param.view(-1)
    pruned = None if mask is None else mask.view(-1) == 0
    direction = grad_flat if pruned is None else grad_flat.masked_fill(pruned, 0.0)
    if weight_decay != 0:
        direction = direction.add(param_flat, alpha=weight_decay)
    new_buffer = None
    if momentum != 0:
        new_buffer = (momentum_buffer if out_momentum_buffer is None else out_momentum_buffer).view(
            -1
        )
        if first_step:
            new_buffer.copy_(direction)
        else:
            torch.mul(momentum_buffer.view(-1), momentum, out=new_buffer)
            new_buffer.add_(direction, alpha=1 - dampening)
        if pruned is not None:
            new_buffer.masked_fill_(pruned, 0.0)
        direction = direction.add(new_buffer, alpha=momentum) if nesterov else new_buffer
    torch.add(param_flat, direction, alpha=-lr, out=new_param)
    if pruned is not None:
        new_param.masked_fill_(pruned, 0.0)
    new_param = new_param.view_as(param if out_param is None else out_param)
    if new_buffer is not None:
        new_buffer = new_buffer.view_as(
            momentum_buffer if out_momentum_buffer is None else out_momentum_buffer
        )
    return new_param, new_buffer


def masked_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    out_param: torch.Tensor | None = None,
    out_exp_avg: torch.Tensor | None = None,
    out_exp_avg_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`imc_kernels.ops.masked_adam_step`.

    Args:
        param: contiguous float32 parameters (any shape, read flat); updated in place unless
            ``out_param`` is given.
        grad: their gradient, same size.
        mask: bool or uint8, nonzero = kept; None for no mask.
        exp_avg: first-moment state, updated in place unless ``out_exp_avg`` is given.
        exp_avg_sq: second-moment state, updated in place unless ``out_exp_avg_sq`` is given.
        step: the step count after this update (1 on the first step), for bias correction.
        lr: learning rate.
        betas: ``(beta1, beta2)``.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient, or decoupled decay (AdamW).
        decoupled_weight_decay: AdamW's ``p *= 1 - lr * weight_decay`` instead of L2.
        out_param: optional buffer for the new parameters.
        out_exp_avg: optional buffer for the new first moment.
        out_exp_avg_sq: optional buffer for the new second moment.

    Returns:
        ``(param, exp_avg, exp_avg_sq)``: the buffers written.

    Raises:
        TypeError: see :func:`check_adam_inputs`.
        ValueError: see :func:`check_adam_inputs`.

    Example:
        >>> p, g, m, v = torch.ones(2), torch.ones(2), torch.zeros(2), torch.zeros(2)
        >>> keep = torch.tensor([True, False])
        >>> masked_adam_step(p, g, keep, m, v, step=1, lr=0.1)[0]  # first step moves by ~lr
        tensor([0.9000, 0.0000])
    """
    check_adam_inputs(
        param,
        grad,
        mask,
        exp_avg,
        exp_avg_sq,
        step=step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        out_param=out_param,
        out_exp_avg=out_exp_avg,
        out_exp_avg_sq=out_exp_avg_sq,
    )
    beta1, beta2 = betas
    param_flat = param.view(-1)
    new_param = param_flat if out_param is None else out_param.view(-1)
    new_exp_avg = (exp_avg if out_exp_avg is None else out_exp_avg).view(-1)
    new_exp_avg_sq = (exp_avg_sq if out_exp_avg_sq is None else out_exp_avg_sq).view(-1)
    pruned = None if mask is None else mask.view(-1) == 0
    g = grad.view(-1) if pruned is None else grad.view(-1).masked_fill(pruned, 0.0)
    if weight_decay != 0 and not decoupled_weight_decay:
        g = g.add(param_flat, alpha=weight_decay)
    if weight_decay != 0 and decoupled_weight_decay:
        torch.mul(param_flat, 1 - lr * weight_decay, out=new_param)
    elif new_param.data_ptr() != param_flat.data_ptr():
        new_param.copy_(param_flat)
    torch.lerp(exp_avg.view(-1), g, 1 - beta1, out=new_exp_avg)
    torch.mul(exp_avg_sq.view(-1), beta2, out=new_exp_avg_sq)
    new_exp_avg_sq.addcmul_(g, g, value=1 - beta2)
    if pruned is not None:
        new_exp_avg.masked_fill_(pruned, 0.0)
        new_exp_avg_sq.masked_fill_(pruned, 0.0)
    step_size, bias_correction2_sqrt = adam_bias_correction(step, lr, betas)
    denom = (new_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    new_param.addcdiv_(new_exp_avg, denom, value=-step_size)
    if pruned is not None:
        new_param.masked_fill_(pruned, 0.0)
    return (
        new_param.view_as(param if out_param is None else out_param),
        new_exp_avg.view_as(exp_avg if out_exp_avg is None else out_exp_avg),
        new_exp_avg_sq.view_as(exp_avg_sq if out_exp_avg_sq is None else out_exp_avg_sq),
    )
