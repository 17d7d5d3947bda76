"""Fused masked optimizer step over one flat multi-tensor buffer (Triton).

Sparse-masked training keeps every parameter of a param group in one contiguous fp32 buffer
(:mod:`imc_kernels.masked` packs them), with a flat gradient buffer, a flat uint8/bool mask and
flat state buffers alongside. One launch then does the whole group's update: masked gradient,
weight decay, SGD momentum or Adam/AdamW moments, state and weights written as exact zeros on
pruned entries. ``torch.optim``'s single-tensor path would run ~6-10 ATen kernels per
parameter tensor plus the mask multiplications; here each element is read once and written once.

Formulas and their order of operations follow the twin ``imc_kernels/reference/masked_optim.py``
(which follows ``torch.optim``); kernel and twin agree to a few fp32 ulp per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from imc_kernels.reference.masked_optim import (
    adam_bias_correction,
    check_adam_inputs,
    check_sgd_inputs,
)

# 1024 elements over 4 warps: 8 fp32 per thread per stream, two 128-bit accesses each. The
# step is bandwidth-bound (Adam moves 4 + 4 + 1 + 4 + 4 bytes in and 12 out per element) and
# keeps at most five streams live, so larger blocks only add registers. The same size as the
# activation kernels; not tuned on hardware in this repository.
_BLOCK_SIZE = 1024
_NUM_WARPS = 4


@triton.jit
def _masked_optim_sgd_kernel(
    param_ptr,
    grad_ptr,
    mask_ptr,
    buffer_ptr,
    out_param_ptr,
    out_buffer_ptr,
    n_elements,
    lr,
    momentum,
    dampening_complement,
    weight_decay,
    HAS_MASK: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # int64 offsets: a flat buffer of a large model passes 2^31 elements.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_bounds = offsets < n_elements
    param = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0)
    direction = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0)
    if HAS_MASK:
        keep = tl.load(mask_ptr + offsets, mask=in_bounds, other=0) != 0
        # A select, not grad * mask: 0 * inf is NaN, and a diverging pruned gradient must
        # not reach the state.
        direction = tl.where(keep, direction, 0.0)
    if HAS_WEIGHT_DECAY:
        direction = direction + weight_decay * param
    if HAS_MOMENTUM:
        if FIRST_STEP:
            # torch.optim.SGD starts the buffer as a copy of the first direction, without
            # dampening; the old contents (possibly uninitialised) are never read.
            buffer = direction
        else:
            buffer = tl.load(buffer_ptr + offsets, mask=in_bounds, other=0.0)
            buffer = buffer * momentum + dampening_complement * direction
        if HAS_MASK:
            buffer = tl.where(keep, buffer, 0.0)
        tl.store(out_buffer_ptr + offsets, buffer, mask=in_bounds)
        if NESTEROV:
            direction = direction + momentum * buffer
        else:
            direction = buffer
    param = param - lr * direction
    if HAS_MASK:
        # Written, not skipped: a pruned weight that was nonzero (a rewind, a user edit) is
        # zero after the next step, and an out_param buffer is fully defined.
        param = tl.where(keep, param, 0.0)
    tl.store(out_param_ptr + offsets, param, mask=in_bounds)


@triton.jit
def _masked_optim_adam_kernel(
    param_ptr,
    grad_ptr,
    mask_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    out_param_ptr,
    out_exp_avg_ptr,
    out_exp_avg_sq_ptr,
    n_elements,
    weight_decay,
    decay_factor,
    lerp_weight,
    beta2,
    one_minus_beta2,
    neg_step_size,
    bias_correction2_sqrt,
    eps,
    HAS_MASK: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    DECOUPLED_WEIGHT_DECAY: tl.constexpr,
    LERP_FROM_END: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_bounds = offsets < n_elements
    param = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0)
    grad = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0)
    if HAS_MASK:
        keep = tl.load(mask_ptr + offsets, mask=in_bounds, other=0) != 0
        grad = tl.where(keep, grad, 0.0)
    if HAS_WEIGHT_DECAY:
        if DECOUPLED_WEIGHT_DECAY:
            # AdamW: the decay scales the weight before the Adam update, outside the moments.
            param = param * decay_factor
        else:
            grad = grad + weight_decay * param
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=in_bounds, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=in_bounds, other=0.0)
    # torch's exp_avg.lerp_(grad, 1 - beta1), evaluated as ATen does: from the end the weight
    # is nearer to, so the result is exact at weight 0 and 1 and monotone in between.
    if LERP_FROM_END:
        exp_avg = grad - (grad - exp_avg) * (1.0 - lerp_weight)
    else:
        exp_avg = exp_avg + lerp_weight * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    if HAS_MASK:
        exp_avg = tl.where(keep, exp_avg, 0.0)
        exp_avg_sq = tl.where(keep, exp_avg_sq, 0.0)
    tl.store(out_exp_avg_ptr + offsets, exp_avg, mask=in_bounds)
    tl.store(out_exp_avg_sq_ptr + offsets, exp_avg_sq, mask=in_bounds)
    # IEEE sqrt and division: Triton's defaults on NVIDIA are the approximate sqrt.approx and
    # div.full (~2 ulp), where ATen (and so torch.optim) rounds correctly. On pruned entries
    # m = v = 0, so the quotient is 0 / eps = 0 and never NaN (eps = 0 only makes it 0/0 there,
    # which the final select discards).
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    param = param + tl.div_rn(neg_step_size * exp_avg, denom)
    if HAS_MASK:
        param = tl.where(keep, param, 0.0)
    tl.store(out_param_ptr + offsets, param, mask=in_bounds)


def _output(out: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    # Checked by check_*_inputs: same size, dtype, device, contiguous.
    return default if out is None else out


def _mask_operand(mask: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    if mask is None:
        # Never dereferenced without HAS_MASK; any valid pointer will do.
        return param
    # bool and uint8 share one byte per element; the view avoids Triton's i1 pointer type.
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


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
    """Triton launcher of :func:`imc_kernels.ops.masked_sgd_step`: one launch per call.

    Args:
        param: contiguous float32 parameters (any shape, read flat); updated in place unless
            ``out_param`` is given.
        grad: their gradient, same size, dtype and device.
        mask: bool or uint8, nonzero = kept; None for no mask.
        momentum_buffer: the momentum state (needed when ``momentum != 0``), updated in place
            unless ``out_momentum_buffer`` is given.
        lr: learning rate.
        momentum: momentum factor.
        dampening: dampening of the momentum.
        weight_decay: L2 penalty.
        nesterov: Nesterov momentum.
        first_step: set the buffer to the update direction instead of reading it (the
            buffer of ``torch.optim.SGD`` does not exist before the first step).
        out_param: optional contiguous float32 buffer for the new parameters.
        out_momentum_buffer: optional buffer for the new momentum state.

    Returns:
        ``(param, momentum_buffer or None)``: the buffers written.

    Raises:
        TypeError: see :func:`imc_kernels.reference.masked_optim.check_sgd_inputs`.
        ValueError: see :func:`imc_kernels.reference.masked_optim.check_sgd_inputs`.
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
    new_param = _output(out_param, param)
    has_momentum = momentum != 0
    new_buffer = _output(out_momentum_buffer, momentum_buffer) if has_momentum else None
    n_elements = param.numel()
    if n_elements == 0:
        return new_param, new_buffer
    # Without momentum the buffer pointers are never dereferenced.
    buffer = momentum_buffer if has_momentum else param
    grid = (triton.cdiv(n_elements, _BLOCK_SIZE),)
    _masked_optim_sgd_kernel[grid](
        param,
        grad,
        _mask_operand(mask, param),
        buffer,
        new_param,
        new_buffer if has_momentum else new_param,
        n_elements,
        float(lr),
        float(momentum),
        float(1 - dampening),
        float(weight_decay),
        HAS_MASK=mask is not None,
        HAS_WEIGHT_DECAY=weight_decay != 0,
        HAS_MOMENTUM=has_momentum,
        FIRST_STEP=bool(first_step),
        NESTEROV=bool(nesterov),
        BLOCK_SIZE=_BLOCK_SIZE,
        num_warps=_NUM_WARPS,
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
    """Triton launcher of :func:`imc_kernels.ops.masked_adam_step`: one launch per call.

    Args:
        param: contiguous float32 parameters (any shape, read flat); updated in place unless
            ``out_param`` is given.
        grad: their gradient, same size, dtype and device.
        mask: bool or uint8, nonzero = kept; None for no mask.
        exp_avg: first-moment state, updated in place unless ``out_exp_avg`` is given.
        exp_avg_sq: second-moment state, updated in place unless ``out_exp_avg_sq`` is given.
        step: the step count after this update (1 on the first step).
        lr: learning rate.
        betas: ``(beta1, beta2)``.
        eps: added to the denominator.
        weight_decay: L2 penalty, or decoupled decay with ``decoupled_weight_decay``.
        decoupled_weight_decay: AdamW.
        out_param: optional contiguous float32 buffer for the new parameters.
        out_exp_avg: optional buffer for the new first moment.
        out_exp_avg_sq: optional buffer for the new second moment.

    Returns:
        ``(param, exp_avg, exp_avg_sq)``: the buffers written.

    Raises:
        TypeError: see :func:`imc_kernels.reference.masked_optim.check_adam_inputs`.
        ValueError: see :func:`imc_kernels.reference.masked_optim.check_adam_inputs`.
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
    new_param = _output(out_param, param)
    new_exp_avg = _output(out_exp_avg, exp_avg)
    new_exp_avg_sq = _output(out_exp_avg_sq, exp_avg_sq)
    n_elements = param.numel()
    if n_elements == 0:
        return new_param, new_exp_avg, new_exp_avg_sq
    beta1, beta2 = (float(beta) for beta in betas)
    # Bias corrections in float64 on the host, once per step, as torch.optim.Adam; the kernel
    # receives them rounded to fp32 as ATen rounds its scalar arguments.
    step_size, bias_correction2_sqrt = adam_bias_correction(step, float(lr), (beta1, beta2))
    lerp_weight = 1 - beta1
    grid = (triton.cdiv(n_elements, _BLOCK_SIZE),)
    _masked_optim_adam_kernel[grid](
        param,
        grad,
        _mask_operand(mask, param),
        exp_avg,
        exp_avg_sq,
        new_param,
        new_exp_avg,
        new_exp_avg_sq,
        n_elements,
        float(weight_decay),
        1 - float(lr) * float(weight_decay),
        lerp_weight,
        beta2,
        1 - beta2,
        -step_size,
        bias_correction2_sqrt,
        float(eps),
        HAS_MASK=mask is not None,
        HAS_WEIGHT_DECAY=weight_decay != 0,
        DECOUPLED_WEIGHT_DECAY=bool(decoupled_weight_decay),
        # ATen's lerp switches form at |weight| = 0.5.
        LERP_FROM_END=abs(lerp_weight) >= 0.5,
        BLOCK_SIZE=_BLOCK_SIZE,
        num_warps=_NUM_WARPS,
    )
    return new_param, new_exp_avg, new_exp_avg_sq
