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
``conv_w(rx_i, g_y)`` stacks the b input tangents along input channels against the one g_y
(one weight-gradient call with bCi inputs whose result holds the b products side by side).
A grouped module keeps the older form, one call with bg groups and g_y copied b times; for
groups = 1 the dense call ran cnn_small's second conv (chunks of 83 samples, b = 4, one
thread) at 3.1 against 13.4 ms per call in isolation: whole block product 211-215 -> 201-205
ms, a k = 32 solve 10.4-11.0 -> 9.9-10.3 s.

An input convolution pooled at once (``conv -> MaxPool2d`` as the first layers with parameters,
after the engine has moved a monotone activation behind the pool): its input is the data, so
no input tangent reaches it and it needs no input gradient, and only the pooled positions of
its output matter. When the operator is made, the rule gathers the input patch under each
pooled position (``F.unfold`` at the argmax indices of the primal pool): ``(Co, K, N P)``
values, ``K = Ci kh kw``, ``P`` pooled positions per channel. A product is then two batched
GEMMs against that matrix, ``ry_i = dW_i patches + dc_i`` straight at the pooled positions and
``(Hv)_W,i = rg_y,i patches^T`` from the pooled ``rg_y``, and the pool passes through: no
full-resolution tangent, no gather, no zero fill and scatter, no weight-gradient convolution
over a mostly zero input. On cnn_small (1 -> 16 channels at 28x28, 2x2 pool, batch 512; the
pair took 12.6 of 56 ms of a single-vector product and 48 of 222 ms at b = 4 in a profile),
one thread, alternating runs: whole product 57.3 -> 50.8 ms at b = 1, 204.6 -> 176.7 ms at
b = 4 (medians of 12); top 10 eigenpairs 1.31 -> 1.18 s, top 32 9.4 -> 8.1 s, same products
and residuals. The price: the patch matrix (58 MB there, 2.25x the layer's output) stays in
the operator's workspace, and building it costs ~40 ms per operator, most of it first-touch
page faults. See ``IMC_CONV_POOL_PATCHES`` and :meth:`Conv2dRule.absorb_max_pool` for when
it runs. Overlapping and padded pool windows are fine (the products sum over pooled
positions, as the scatter added). A bias is one more row of the matrix (ones), and an
activation right after the pool whose tangent passes only multiply by ``act'(z)`` (ReLU,
LeakyReLU; any for the GGN) is folded in by scaling each pooled position's column by
``act'(z)`` (:meth:`Conv2dRule.absorb_activation`).

Two ways to run those calls over the batch (``IMC_CONV_BLOCK_PATH``):

* ``batched``: each term is one call over the whole batch, outputs freshly allocated. The
  default on CUDA, where cuDNN runs large and grouped calls well.
* ``chunked``: the same per-term calls on chunks of samples sized so that every operand and
  temporary of a call is about ``CHUNK_BYTES``, written into output buffers the rule keeps
  between products. The default on the CPU. Every term is separable over samples (the
  weight terms are sums over them), so chunking changes only the summation order.

Why chunks on the CPU (cnn_small's second conv, 16->32 channels at 14x14, batch 512, b = 8,
one thread, ms per vector, whole batch -> chunks of 16 samples, 3 MB): tangent forward
35 -> 11, weight terms 11 -> 5.3 and 17 -> 5.7, input terms 29 -> 10; at b = 32 the forward
went 81 -> 12. One convolution of the plain batch takes 5.3 ms, so the whole-batch block calls
ran 2-3x (up to 15x at b = 32) slower per vector than single products. The cause is memory,
not the convolution algorithm: a block tensor is b times larger (100 MB for this layer at
b = 8), so glibc serves it from fresh mmap pages every call and first-touch page faults cost
about 0.4 ms/MB on the benchmark machine (a 100 MB fill: 41 ms fresh, 3.3 ms into reused
memory), and the operands stream from DRAM instead of staying in cache. im2col GEMMs
(``F.unfold`` once per operator, then ``matmul``) were measured too and lost to chunked
convolutions (10-15 vs 5-7 ms per vector for the weight and input terms): oneDNN's direct
kernels beat GEMMs with 144- to 288-long reductions, and the patch matrices cost 9x the
activations. Whole fused product on cnn_small at b = 8, one thread: 1.42 -> 0.69 gradients
per vector. The price is memory: the kept buffers (``LayerRule.kept``, within the operator's
workspace budget) hold one block tangent of the layer's output and one of its input between
products (what a product allocates anyway). Chunks also mean
more OpenMP parallel regions: with two threads in a niced process beside a full-core job,
each region waited for a descheduled thread and the cost followed the chunk count (b = 8:
whole batch 245, 24 MiB chunks 365, 8 MiB 786 ms per vector; one gradient took 340 ms there
against 90 ms on one thread). Quiet multi-core machines are not measured yet;
``IMC_CONV_BLOCK_PATH=batched`` restores the whole-batch calls.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from imc_kernels.hvp.layers.base import LayerRule, unsupported
from imc_kernels.hvp.layers.pool import MaxPool2dRule
from imc_kernels.reference import activation as activation_reference

BLOCK_PATHS = ("auto", "batched", "chunked")

# Target size of the largest per-sample-chunk operand. On the benchmark CPU (AMD EPYC, 2
# cores) chunks of 3 to 13 MB ran equally fast and 25 MB chunks ran 3x slower (temporaries
# near glibc's 32 MB mmap threshold get fresh pages again); 8 MiB sits in the flat middle.
# Tests lower it to force several chunks with a ragged last one.
CHUNK_BYTES = 8 * 2**20


def _setting(variable: str, choices: tuple[str, ...]) -> str:
    """The environment ``variable`` lower-cased, ``"auto"`` when unset or empty.

    Raises:
        ValueError: it holds something outside ``choices``.
    """
    setting = os.environ.get(variable, "auto").strip().lower() or "auto"
    if setting not in choices:
        raise ValueError(
            f"{variable}={setting!r} is not one of {', '.join(choices)}; "
            "unset it to let the Conv2d rule choose by device"
        )
    return setting


def block_path(device: torch.device) -> str:
    """``"batched"`` or ``"chunked"``: how the block terms run on ``device``.

    Read from ``IMC_CONV_BLOCK_PATH`` on every product: ``auto`` (default) picks ``chunked``
    on the CPU and ``batched`` elsewhere; ``batched`` or ``chunked`` force one path.

    Raises:
        ValueError: the variable holds something else.
    """
    setting = _setting("IMC_CONV_BLOCK_PATH", BLOCK_PATHS)
    if setting == "auto":
        return "chunked" if device.type == "cpu" else "batched"
    return setting


ENV_POOL_PATCHES = "IMC_CONV_POOL_PATCHES"
POOL_PATCH_MODES = ("auto", "on", "off")

# With IMC_CONV_POOL_PATCHES=auto, patches are taken when they hold at most this many values
# per value of the convolution's output (K * P <= 4 * Ho * Wo): a product reads the patch
# matrix twice where the convolution path writes, fills, scatters and reads
# full-resolution tangents. cnn_small's first layer (K = 9, 2x2 pool) has 2.25.
PATCH_RATIO_LIMIT = 4


def pool_patch_ratio_limit(device: torch.device) -> float | None:
    """The largest patch-to-output size ratio at which an input convolution followed by max
    pooling runs on pooled patches (see :meth:`Conv2dRule.absorb_max_pool`); None: never.

    Read from ``IMC_CONV_POOL_PATCHES`` when an operator is made: ``auto`` (default) gives
    :data:`PATCH_RATIO_LIMIT` on the CPU, where the path was measured, and None elsewhere
    (pending a GPU measurement); ``on`` gives no ratio limit on any device (the workspace
    budget still applies); ``off`` gives None (the convolution path).

    Raises:
        ValueError: the variable holds something else.
    """
    setting = _setting(ENV_POOL_PATCHES, POOL_PATCH_MODES)
    if setting == "off":
        return None
    if setting == "on":
        return math.inf
    return PATCH_RATIO_LIMIT if device.type == "cpu" else None


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
        # Set by absorb_max_pool: the (Co, K [+ 1], N*P) patch matrix, K = Ci*kh*kw taps
        # (then a row for the bias), and the pool's output shape.
        self.patches: torch.Tensor | None = None
        self.taps = 0
        self.pooled_shape: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ pooled patches

    def absorb_max_pool(self, pool: MaxPool2dRule, ratio_limit: float | None) -> bool:
        """Run this convolution and the max pool after it as one linear map on pooled
        patches (module docstring); returns whether it does.

        The engine calls it once the primal passes have run, only when this is the first rule
        with trainable parameters (its input tangent is always zero and it returns no input
        gradient) and ``pool`` the next rule. Taken when the module is ungrouped, the patch
        matrix holds at most ``ratio_limit`` values per value of the convolution's output
        (:func:`pool_patch_ratio_limit`), and it fits the workspace budget beside the
        buffers already kept (it is kept in the workspace, so it counts against it).

        The matrix has one row per tap of the kernel, then, with a bias, a row of ones: the
        bias tangent is then one more weight column of the same GEMM, and its product one
        more output column.
        """
        if ratio_limit is None or self.module.groups != 1:
            return False
        n, co, ho, wo = self.y_shape
        pooled = tuple(pool.y_shape)
        p = pooled[2] * pooled[3]
        kh, kw = self.module.kernel_size
        taps = self.x.shape[1] * kh * kw
        if taps * p > ratio_limit * ho * wo:
            return False
        rows = taps + (self.module.bias is not None)
        needed = co * rows * n * p * self.x.element_size()
        if self.workspace.nbytes + needed > self.workspace.limit_bytes:
            return False
        patches = self.workspace.get((id(self), "patches"), (co, rows, n * p), self.x)
        columns = F.unfold(
            self.x,
            self.module.kernel_size,
            dilation=self.module.dilation,
            padding=self.padding,
            stride=self.module.stride,
        )  # (N, K, Ho*Wo), positions in the order of the pool's flat indices
        view = patches.view(co, rows, n, p)
        for c in range(co):  # one channel at a time: no (N, Co, K, P) temporary
            index = pool.indices[:, c : c + 1].expand(n, taps, p)
            view[c, :taps].copy_(torch.gather(columns, 2, index).transpose(0, 1))
        if rows > taps:
            view[:, taps].fill_(1)
        self.patches, self.taps, self.pooled_shape = patches, taps, pooled
        pool.absorbed = True
        return True

    def absorb_activation(self, activation) -> bool:
        """After :meth:`absorb_max_pool`, also take the elementwise activation that follows
        the pool (``ActivationRule``), when its tangent passes are a product with ``act'(z)``
        alone: ReLU and LeakyReLU (``act'' = 0``), or any activation for the GGN. Each
        pooled position's patch column (the bias row included) is scaled by ``act'(z)`` there
        once, and the activation's tangent passes hand their input through: two elementwise
        passes less per product. Returns whether it did."""
        if self.patches is None:
            return False
        if self.hessian and activation.kind not in ("relu", "leaky_relu"):
            return False
        slope = activation.negative_slope
        d1, _ = activation_reference.derivatives(activation.z, activation.kind, slope, False)
        co, rows = self.patches.shape[:2]
        n = d1.shape[0]
        scale = d1.reshape(n, co, -1).transpose(0, 1).unsqueeze(1)  # (Co, 1, N, P)
        self.patches.view(co, rows, n, -1).mul_(scale)
        activation.absorbed = True
        return True

    def _pooled_forward(self, d_weight, d_bias):
        """``dW_i patches + dc_i`` at the pooled positions, as (N, b, Co, Hp, Wp)."""
        n, co, hp, wp = self.pooled_shape
        p = hp * wp
        rows, taps = self.patches.shape[1], self.taps
        b = (d_weight if d_weight is not None else d_bias).shape[0]
        # The (Co, b, K [+ 1]) weights of the GEMM: the weight tangents, the bias tangents.
        weights = self.patches.new_zeros(co, b, rows)
        if d_weight is not None:
            weights[:, :, :taps] = d_weight.reshape(b, co, taps).transpose(0, 1)
        if d_bias is not None:
            weights[:, :, taps] = d_bias.T
        product = self.kept("patch_product", (co, b, n * p), self.patches)
        torch.bmm(weights, self.patches, out=product)
        ry = self.kept("ry_pooled", (n, b, co, hp, wp), self.patches)
        ry.view(n, b, co, p).copy_(product.view(co, b, n, p).permute(2, 1, 0, 3))
        return ry

    def _pooled_backward(self, rg_y):
        """``(Hv)_W = rg_y patches^T`` and ``(Hv)_c = sum rg_y`` (the bias row's column) from
        the pooled ``rg_y``."""
        n, b, co = rg_y.shape[:3]
        p = rg_y.shape[3] * rg_y.shape[4]
        weight, bias = self.module.weight, self.module.bias
        # (Co, b, N*P): each channel's b rows contiguous for the batched GEMM.
        grads = self.kept("rg_pooled", (co, b, n, p), rg_y)
        grads.copy_(rg_y.view(n, b, co, p).permute(2, 1, 0, 3))
        hv = torch.bmm(grads.view(co, b, n * p), self.patches.transpose(1, 2))  # (Co, b, rows)
        hv_weight = hv_bias = None
        if weight.requires_grad:
            hv_weight = hv[:, :, : self.taps].transpose(0, 1).reshape(b, *weight.shape)
        if bias is not None and bias.requires_grad:
            hv_bias = hv[:, :, self.taps].T.contiguous()
        return hv_weight, hv_bias

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

    # ------------------------------------------------------------------ sample chunks

    def _sample_chunks(self, b: int) -> list[slice]:
        """Slices of the batch for one product; a single slice on the batched path."""
        n = self.x.shape[0]
        if block_path(self.x.device) == "batched":
            return [slice(None)]
        per_sample = max(1, b * max(self.x[0].numel(), self.y_shape[1:].numel()))
        size = max(1, CHUNK_BYTES // (per_sample * self.x.element_size()))
        if size >= n:
            return [slice(None)]
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _over_chunks(self, role: str, shape: tuple[int, ...], chunks: list[slice], terms):
        """``terms(s)`` for each sample slice ``s``, gathered along the batch: the one call's
        own result for a single chunk, else the kept buffer for ``role`` filled chunk by
        chunk."""
        if len(chunks) == 1:
            return terms(chunks[0])
        out = self.kept(role, shape, self.x)
        for s in chunks:
            out[s] = terms(s)
        return out

    # ------------------------------------------------------------------ tangent passes

    def tangent_forward(self, rx, dparams):
        d_weight = dparams[0]
        d_bias = dparams[1] if self.module.bias is not None else None
        self.rx, self.d_weight = rx, d_weight
        if rx is None and d_weight is None and d_bias is None:
            return None
        if self.patches is not None:
            if rx is not None:  # absorb_max_pool is only called for the first such rule
                raise RuntimeError("a pooled input convolution received an input tangent")
            return self._pooled_forward(d_weight, d_bias)
        b = rx.shape[1] if rx is not None else next(t for t in dparams if t is not None).shape[0]
        n, co, ho, wo = self.y_shape
        return self._over_chunks(
            "ry",
            (n, b, co, ho, wo),
            self._sample_chunks(b),
            lambda s: self._forward_terms(
                self.x[s], None if rx is None else rx[s], d_weight, d_bias, b
            ),
        )

    def _forward_terms(self, x, rx, d_weight, d_bias, b):
        """``conv(x, dW_i) + conv(rx_i, W) + dc_i`` for samples ``x`` (n, Ci, H, W)."""
        weight = self.module.weight
        n = x.shape[0]
        co, ho, wo = self.y_shape[1:]
        if d_weight is not None:
            if self.module.groups == 1:
                # The b weight tangents as b*Co output channels: output (n, b*Co, Ho, Wo).
                ry = self._conv(x, d_weight.flatten(0, 1)).view(n, b, co, ho, wo)
            else:
                ry = torch.stack([self._conv(x, d_weight[i]) for i in range(b)], dim=1)
            if rx is not None:
                ry += self._conv(rx.flatten(0, 1), weight).view(n, b, co, ho, wo)
        elif rx is not None:
            # (n, b, Ci, H, W) is a batch of n*b samples for the shared weight: a free view.
            ry = self._conv(rx.flatten(0, 1), weight).view(n, b, co, ho, wo)
        else:
            ry = torch.zeros(n, b, co, ho, wo, dtype=weight.dtype, device=weight.device)
        if d_bias is not None:
            ry += d_bias.view(1, b, co, 1, 1)
        return ry

    def tangent_backward(self, rg_y, need_input_grad):
        if self.patches is not None:
            if need_input_grad:
                raise RuntimeError("a pooled input convolution was asked for an input gradient")
            hv_weight, hv_bias = self._pooled_backward(rg_y)
            return None, [hv_weight] + ([hv_bias] if self.module.bias is not None else [])
        weight = self.module.weight
        n, b = rg_y.shape[:2]
        rg_y = rg_y.contiguous()
        chunks = self._sample_chunks(b)
        hv_weight = hv_bias = None
        want_bias = self.module.bias is not None and self.module.bias.requires_grad
        if weight.requires_grad:
            # The bias products come out of the same weight-gradient calls (groups = 1).
            for s in chunks:
                part, part_bias = self._weight_terms(s, rg_y[s], b, want_bias)
                hv_weight = part if hv_weight is None else hv_weight.add_(part)
                if part_bias is not None:
                    hv_bias = part_bias if hv_bias is None else hv_bias.add_(part_bias)
        if want_bias and hv_bias is None:
            hv_bias = rg_y.sum(dim=(0, 3, 4))
        rg_x = None
        if need_input_grad:
            rg_x = self._over_chunks(
                "rg_x",
                (n, b, *self.x.shape[1:]),
                chunks,
                lambda s: self._input_terms(s, rg_y[s], b),
            )
        hv = [hv_weight] + ([hv_bias] if self.module.bias is not None else [])
        return rg_x, hv

    def _weight_terms(self, s: slice, rg_y, b, want_bias=False):
        """``conv_w(x, rg_y_i) + conv_w(rx_i, g_y)`` over the samples ``s``, as (b, *W.shape),
        and with ``want_bias`` (groups = 1) the bias products ``sum(rg_y_i)`` as (b, Co), from
        the same call (else None)."""
        weight = self.module.weight
        x = self.x[s]
        n, co = rg_y.shape[0], rg_y.shape[2]
        hv_bias = None
        if self.module.groups == 1:
            stacked = rg_y.view(n, b * co, *rg_y.shape[3:])
            args = self.conv_args
            _, hv_weight, hv_bias = torch.ops.aten.convolution_backward(
                stacked,
                x,
                stacked.new_empty(1).expand(b * co, *weight.shape[1:]),  # its shape only
                [b * co] if want_bias else None,
                args["stride"],
                args["padding"],
                args["dilation"],
                False,
                [0, 0],
                1,
                (False, True, want_bias),
            )
            hv_weight = hv_weight.view(b, *weight.shape)
            if hv_bias is not None:
                hv_bias = hv_bias.view(b, co)
        else:
            hv_weight = torch.stack(
                [conv2d_weight(x, weight.shape, rg_y[:, i], **self.conv_args) for i in range(b)]
            )
        if self.hessian and self.rx is not None:
            hv_weight += self._weight_grad_of_input_tangents(self.rx[s], self.g_y[s])
        return hv_weight, hv_bias

    def _input_terms(self, s: slice, rg_y, b):
        """``conv_x(rg_y_i, W) + conv_x(g_y, dW_i)`` over the samples ``s``, as (n, b, Ci, H, W)."""
        n = rg_y.shape[0]
        rg_x = conv2d_input(
            (n * b, *self.x.shape[1:]), self.module.weight, rg_y.flatten(0, 1), **self.conv_args
        ).view(n, b, *self.x.shape[1:])
        if self.hessian and self.d_weight is not None:
            rg_x += self._input_grad_of_weight_tangents(self.g_y[s], b)
        return rg_x

    def _weight_grad_of_input_tangents(self, rx, g_y):
        """``conv_w(rx_i, g_y)`` for the whole block, as (b, *W.shape)."""
        weight, groups = self.module.weight, self.module.groups
        n, b, ci = rx.shape[:3]
        co = weight.shape[0]
        inputs = rx.reshape(n, b * ci, *rx.shape[3:])
        if groups == 1:
            # The b input tangents as b*Ci input channels against the one g_y: a dense call
            # whose (Co, b*Ci, kh, kw) result holds the b products side by side.
            out = conv2d_weight(inputs, (co, b * ci, *weight.shape[2:]), g_y, **self.conv_args)
            return out.view(co, b, ci, *weight.shape[2:]).transpose(0, 1)
        grads = g_y.unsqueeze(1).expand(n, b, *g_y.shape[1:])
        grads = grads.reshape(n, b * co, *g_y.shape[2:])
        args = dict(self.conv_args, groups=b * groups)
        return conv2d_weight(inputs, (b * co, *weight.shape[1:]), grads, **args).view(
            b, *weight.shape
        )

    def _input_grad_of_weight_tangents(self, g_y, b):
        """``conv_x(g_y, dW_i)`` for the whole block, as (n, b, Ci, H, W)."""
        n = g_y.shape[0]
        ci, spatial = self.x.shape[1], self.x.shape[2:]
        if self.module.groups == 1:
            # The b weight tangents side by side as one (Co, b*Ci, kh, kw) weight.
            stacked = self.d_weight.transpose(0, 1).reshape(
                self.d_weight.shape[1], b * ci, *self.d_weight.shape[3:]
            )
            out = conv2d_input((n, b * ci, *spatial), stacked, g_y, **self.conv_args)
            return out.view(n, b, ci, *spatial)
        return torch.stack(
            [
                conv2d_input((n, ci, *spatial), self.d_weight[i], g_y, **self.conv_args)
                for i in range(b)
            ],
            dim=1,
        )
