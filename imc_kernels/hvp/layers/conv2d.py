"""HVP rule for ``nn.Conv2d``: ``y = conv(x, W) + c`` (zero padding, any stride/dilation/groups).

Shapes: ``x`` (N, Ci, H, W), ``W`` (Co, Ci/g, kh, kw), ``y`` (N, Co, Ho, Wo); tangents carry a
leading block dimension b. With ``conv_x`` the input gradient (transposed convolution) and
``conv_w`` the weight gradient (cuDNN / oneDNN ``convolution_backward``):

* tangent forward  ``ry_i = conv(x, dW_i) + conv(rx_i, W) + dc_i``
* primal backward  ``g_x = conv_x(g_y, W)``
* tangent backward ``rg_x_i = conv_x(rg_y_i, W) + conv_x(g_y, dW_i)``   (second: Hessian only)
* weight products  ``(Hv)_W,i = conv_w(x, rg_y_i) + conv_w(rx_i, g_y)`` (second: Hessian only)
  ``(Hv)_c,i = sum_{n,h,w} rg_y_i``

Batching the block (kernel_design.md section 2.2): terms with a shared weight stack the b
tangents along the batch (one convolution of batch bN); terms with a shared input stack the b
weight tangents along output channels (one convolution with bCo outputs, groups = 1), and
``conv_w(rx_i, g_y)`` is one grouped weight-gradient call with b groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from imc_kernels.hvp.layers.base import LayerRule, unsupported


def conv2d_unsupported_reason(module) -> str | None:
    if module.padding_mode != "zeros":
        return unsupported(module, f"padding_mode={module.padding_mode!r}")
    if isinstance(module.padding, str) and _same_padding(module) is None:
        return unsupported(module, "asymmetric 'same' padding")
    return None


def _same_padding(module) -> tuple[int, int] | None:
    if module.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(module.kernel_size, module.dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return tuple(pads)


class Conv2dRule(LayerRule):
    def __init__(self, module, curvature):
        super().__init__(module, curvature)
        padding = module.padding
        self.padding = _same_padding(module) if isinstance(padding, str) else tuple(padding)
        self.conv_args = dict(
            stride=module.stride,
            padding=self.padding,
            dilation=module.dilation,
            groups=module.groups,
        )

    def _conv(self, x, weight, bias=None):
        return F.conv2d(x, weight, bias, **self.conv_args)

    def primal_forward(self, x):
        self.x = x
        y = self._conv(x, self.module.weight, self.module.bias)
        self.y_shape = y.shape
        return y

    def primal_backward(self, g_y, need_input_grad):
        self.g_y = g_y
        if not need_input_grad:
            return None
        return conv2d_input(self.x.shape, self.module.weight, g_y, **self.conv_args)

    def tangent_forward(self, rx, dparams):
        weight = self.module.weight
        d_weight = dparams[0]
        d_bias = dparams[1] if self.module.bias is not None else None
        self.rx, self.d_weight = rx, d_weight
        if rx is None and d_weight is None and d_bias is None:
            return None
        n, co, ho, wo = self.y_shape
        b = rx.shape[1] if rx is not None else next(t for t in dparams if t is not None).shape[0]
        if d_weight is not None:
            if self.module.groups == 1:
                # The b weight tangents as b*Co output channels: output (N, b*Co, Ho, Wo).
                ry = self._conv(self.x, d_weight.flatten(0, 1)).view(n, b, co, ho, wo)
            else:
                ry = torch.stack([self._conv(self.x, d_weight[i]) for i in range(b)], dim=1)
            if rx is not None:
                ry += self._conv(rx.flatten(0, 1), weight).view(n, b, co, ho, wo)
        elif rx is not None:
            # (N, b, Ci, H, W) is a batch of N*b samples for the shared weight: a free view.
            ry = self._conv(rx.flatten(0, 1), weight).view(n, b, co, ho, wo)
        else:
            ry = torch.zeros(n, b, co, ho, wo, dtype=weight.dtype, device=weight.device)
        if d_bias is not None:
            ry += d_bias.view(1, b, co, 1, 1)
        return ry

    def tangent_backward(self, rg_y, need_input_grad):
        weight = self.module.weight
        n, b, co = rg_y.shape[:3]
        rg_y = rg_y.contiguous()
        hv_weight = hv_bias = None
        if weight.requires_grad:
            if self.module.groups == 1:
                stacked = rg_y.view(n, b * co, *rg_y.shape[3:])
                hv_weight = conv2d_weight(
                    self.x, (b * co, *weight.shape[1:]), stacked, **self.conv_args
                ).view(b, *weight.shape)
            else:
                hv_weight = torch.stack(
                    [
                        conv2d_weight(self.x, weight.shape, rg_y[:, i], **self.conv_args)
                        for i in range(b)
                    ]
                )
            if self.hessian and self.rx is not None:
                hv_weight += self._weight_grad_of_input_tangents()
        if self.module.bias is not None and self.module.bias.requires_grad:
            hv_bias = rg_y.sum(dim=(0, 3, 4))
        rg_x = None
        if need_input_grad:
            rg_x = conv2d_input(
                (n * b, *self.x.shape[1:]), weight, rg_y.flatten(0, 1), **self.conv_args
            ).view(n, b, *self.x.shape[1:])
            if self.hessian and self.d_weight is not None:
                rg_x += self._input_grad_of_weight_tangents(b)
        hv = [hv_weight] + ([hv_bias] if self.module.bias is not None else [])
        return rg_x, hv

    def _weight_grad_of_input_tangents(self):
        """``conv_w(rx_i, g_y)`` for the whole block in one grouped call (b * g groups)."""
        weight, groups = self.module.weight, self.module.groups
        n, b, ci = self.rx.shape[:3]
        co = weight.shape[0]
        inputs = self.rx.reshape(n, b * ci, *self.rx.shape[3:])
        grads = self.g_y.unsqueeze(1).expand(n, b, *self.g_y.shape[1:])
        grads = grads.reshape(n, b * co, *self.g_y.shape[2:])
        args = dict(self.conv_args, groups=b * groups)
        return conv2d_weight(inputs, (b * co, *weight.shape[1:]), grads, **args).view(
            b, *weight.shape
        )

    def _input_grad_of_weight_tangents(self, b):
        """``conv_x(g_y, dW_i)`` for the whole block, as (N, b, Ci, H, W)."""
        n, ci = self.x.shape[:2]
        if self.module.groups == 1:
            # The b weight tangents side by side as one (Co, b*Ci, kh, kw) weight.
            stacked = self.d_weight.transpose(0, 1).reshape(
                self.d_weight.shape[1], b * ci, *self.d_weight.shape[3:]
            )
            out = conv2d_input((n, b * ci, *self.x.shape[2:]), stacked, self.g_y, **self.conv_args)
            return out.view(n, b, ci, *self.x.shape[2:])
        return torch.stack(
            [
                conv2d_input(self.x.shape, self.d_weight[i], self.g_y, **self.conv_args)
                for i in range(b)
            ],
            dim=1,
        )
