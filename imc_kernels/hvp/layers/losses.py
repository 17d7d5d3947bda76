"""HVP rules for the losses the fused engine supports: softmax cross-entropy and MSE.

A loss rule maps the network output ``z`` to a scalar; its Hessian ``H_L`` maps an output
tangent to the tangent of ``g_z``:

* cross-entropy (mean over non-ignored rows, or sum): ``g_z = s (p - onehot)``,
  ``rg_z_i = s (p u_i - p (p . u_i))`` with ``p = softmax(z)``, one fused kernel
  (:func:`imc_kernels.ops.cross_entropy_hvp`) reading the logits once for primal and block;
* MSE (mean over elements, or sum): ``L = s sum (z - t)^2``, ``g_z = 2 s (z - t)``,
  ``rg_z_i = 2 s u_i``.

The loss Hessian is the same for the Hessian and the GGN.
"""

from __future__ import annotations

import torch
from torch import nn

from imc_kernels import _dispatch, ops
from imc_kernels.hvp._common import is_cross_entropy, is_mse


def loss_unsupported_reason(loss_fn, output_shape, targets: torch.Tensor) -> str | None:
    if is_cross_entropy(loss_fn):
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            if loss_fn.weight is not None:
                return "CrossEntropyLoss with class weights"
            if loss_fn.label_smoothing:
                return "CrossEntropyLoss with label smoothing"
            if loss_fn.reduction not in ("mean", "sum"):
                return f"CrossEntropyLoss(reduction={loss_fn.reduction!r})"
        if len(output_shape) != 2 or targets.dtype.is_floating_point:
            return "cross-entropy on outputs other than (N, C) with class-index targets"
        return None
    if is_mse(loss_fn):
        if isinstance(loss_fn, nn.MSELoss) and loss_fn.reduction not in ("mean", "sum"):
            return f"MSELoss(reduction={loss_fn.reduction!r})"
        if tuple(targets.shape) != tuple(output_shape):
            return "MSE with targets that broadcast"
        return None
    return f"loss {getattr(loss_fn, '__name__', type(loss_fn).__name__)} (not cross-entropy or MSE)"


class CrossEntropyRule:
    def __init__(self, loss_fn):
        self.reduction = getattr(loss_fn, "reduction", "mean")
        self.ignore_index = getattr(loss_fn, "ignore_index", -100)

    def primal(self, z, targets):
        self.z, self.targets = z, targets
        n_valid = int((targets != self.ignore_index).sum()) if self.reduction == "mean" else 1
        # F.cross_entropy's mean over zero valid rows is NaN; so is ours (0/0), caught later.
        self.scale = 1.0 / n_valid if n_valid else float("nan")
        row_loss, g_z, _ = ops.cross_entropy_hvp(
            z,
            targets,
            z.new_empty((0, *z.shape)),
            scale=self.scale,
            ignore_index=self.ignore_index,
        )
        self.p_masked = None
        self.tangent_kernel = None
        backend = _dispatch.select(
            "cross_entropy", z.device, z.dtype, available=("triton", "reference")
        )
        if backend == "reference":
            valid = (targets != self.ignore_index).unsqueeze(1)
            self.p_masked = torch.where(valid, torch.softmax(z, dim=1), 0.0)
        else:
            # Products call the Triton launcher, not ops.cross_entropy_hvp: the targets were
            # checked by the call above, and the dispatcher's check reads them on the host,
            # a device sync per product that CUDA-graph capture forbids (hvp/cuda_graph.py).
            from imc_kernels.ops import cross_entropy as triton_cross_entropy

            self.tangent_kernel = triton_cross_entropy.cross_entropy_hvp
        return row_loss.sum() * self.scale, g_z

    def tangent(self, rz):
        if self.p_masked is not None:
            # Reference path with the softmax cached at primal time (a primal quantity).
            p = self.p_masked.unsqueeze(1)
            return (p * rz - p * (p * rz).sum(dim=2, keepdim=True)) * self.scale
        # The kernel takes (b, N, C); the engine's tangents are (N, b, C).
        _, _, rg = self.tangent_kernel(
            self.z,
            self.targets,
            rz.transpose(0, 1),
            scale=self.scale,
            ignore_index=self.ignore_index,
            write_primal=False,
        )
        return rg.transpose(0, 1)


class MSERule:
    def __init__(self, loss_fn):
        self.reduction = getattr(loss_fn, "reduction", "mean")

    def primal(self, z, targets):
        self.scale = 1.0 / z.numel() if self.reduction == "mean" else 1.0
        residual = z - targets
        return (residual * residual).sum() * self.scale, residual * (2.0 * self.scale)

    def tangent(self, rz):
        return rz * (2.0 * self.scale)


def make_loss_rule(loss_fn):
    if is_cross_entropy(loss_fn):
        return CrossEntropyRule(loss_fn)
    return MSERule(loss_fn)
