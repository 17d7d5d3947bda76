"""Dispatched kernel entry points.

Each function here picks a backend with :func:`imc_kernels._dispatch.select` and calls the
Triton launcher (``imc_kernels/ops/<family>.py``), the C++ extension, or the pure-PyTorch twin
(``imc_kernels/reference/<family>.py``). All implementations share one signature, so the twin
is the CPU path, the test oracle and the benchmark baseline at once.
"""

from __future__ import annotations

import functools
import os

import torch

from imc_kernels import _dispatch
from imc_kernels.reference import activation as _ref_activation
from imc_kernels.reference import block_orth as _ref_block_orth
from imc_kernels.reference import cross_entropy as _ref_cross_entropy
from imc_kernels.reference import gemm as _ref_gemm
from imc_kernels.reference import lanczos_vector as _ref_lanczos_vector
from imc_kernels.reference import masked_optim as _ref_masked_optim
from imc_kernels.reference import ritz as _ref_ritz
from imc_kernels.reference import tsmm as _ref_tsmm

ACTIVATIONS = _ref_activation.ACTIVATIONS


def activation_jvp(
    z: torch.Tensor,
    tangents: torch.Tensor,
    kind: str,
    *,
    negative_slope: float = 0.01,
    write_primal: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Activation forward for the primal and a block of tangents in one pass.

    ``a = act(z)`` and ``ra[i] = act'(z) * tangents[i]``.

    Args:
        z: pre-activation, any shape ``S``.
        tangents: ``(b, *S)`` tangents of ``z`` (``b`` may be 0).
        kind: one of :data:`ACTIVATIONS`.
        negative_slope: LeakyReLU slope.
        write_primal: also return ``a``; else the first output is None.

    Returns:
        ``(a or None, ra)`` with ``ra`` shaped like ``tangents``.
    """
    _ref_activation.check_inputs(z, tangents, kind)
    backend = _dispatch.select("activation", z.device, z.dtype, available=("triton", "reference"))
    if backend == "triton":
        from imc_kernels.ops import activation as _triton_activation

        return _triton_activation.activation_jvp(
            z, tangents, kind, negative_slope=negative_slope, write_primal=write_primal
        )
    return _ref_activation.activation_jvp(
        z, tangents, kind, negative_slope=negative_slope, write_primal=write_primal
    )


def activation_hvp_backward(
    z: torch.Tensor,
    tangents: torch.Tensor | None,
    grad: torch.Tensor,
    grad_tangents: torch.Tensor,
    kind: str,
    *,
    negative_slope: float = 0.01,
    curvature: str = "hessian",
    write_primal: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Activation backward for the primal gradient and a block of tangent gradients.

    ``g_z = act'(z) * grad`` and
    ``rg_z[i] = act'(z) * grad_tangents[i] + act''(z) * tangents[i] * grad``;
    the second-derivative term is dropped for ``curvature="ggn"``.

    Args:
        z: pre-activation, shape ``S``.
        tangents: ``(b, *S)`` forward tangents of ``z`` (unused, may be None, for GGN).
        grad: ``S``, the primal gradient with respect to the activation output.
        grad_tangents: ``(b, *S)``, the tangents of ``grad``.
        kind: one of :data:`ACTIVATIONS`.
        negative_slope: LeakyReLU slope.
        curvature: ``"hessian"`` or ``"ggn"``.
        write_primal: also return ``g_z``; else the first output is None.

    Returns:
        ``(g_z or None, rg_z)``.
    """
    _ref_activation.check_backward_inputs(z, tangents, grad, grad_tangents, kind, curvature)
    backend = _dispatch.select("activation", z.device, z.dtype, available=("triton", "reference"))
    if backend == "triton":
        from imc_kernels.ops import activation as _triton_activation

        return _triton_activation.activation_hvp_backward(
            z,
            tangents,
            grad,
            grad_tangents,
            kind,
            negative_slope=negative_slope,
            curvature=curvature,
            write_primal=write_primal,
        )
    return _ref_activation.activation_hvp_backward(
        z,
        tangents,
        grad,
        grad_tangents,
        kind,
        negative_slope=negative_slope,
        curvature=curvature,
        write_primal=write_primal,
    )


def cross_entropy_hvp(
    logits: torch.Tensor,
    target: torch.Tensor,
    tangents: torch.Tensor,
    *,
    scale: float,
    ignore_index: int = -100,
    write_primal: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Softmax cross-entropy: row losses, gradient and tangent gradients from one read.

    With ``p = softmax(logits)`` per row:
    ``grad = scale * (p - onehot(target))`` and
    ``rgrad[i] = scale * (p * u_i - p * (p . u_i))`` for ``u_i = tangents[i]``.
    Rows whose target equals ``ignore_index`` get zeros.

    Args:
        logits: ``(N, C)``.
        target: ``(N,)`` integer class indices.
        tangents: ``(b, N, C)`` tangents of the logits.
        scale: the loss reduction's weight per row (``1/N`` for a mean).
        ignore_index: target value that marks a row to ignore.
        write_primal: also return the row losses (unscaled, ``(N,)``) and ``grad``.

    Returns:
        ``(row_loss or None, grad or None, rgrad)``.
    """
    _ref_cross_entropy.check_inputs(logits, target, tangents, ignore_index)
    backend = _dispatch.select(
        "cross_entropy", logits.device, logits.dtype, available=("triton", "reference")
    )
    if backend == "triton":
        from imc_kernels.ops import cross_entropy as _triton_cross_entropy

        return _triton_cross_entropy.cross_entropy_hvp(
            logits,
            target,
            tangents,
            scale=scale,
            ignore_index=ignore_index,
            write_primal=write_primal,
        )
    return _ref_cross_entropy.cross_entropy_hvp(
        logits, target, tangents, scale=scale, ignore_index=ignore_index, write_primal=write_primal
    )


def gemm(
    a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None, beta: float = 0.0
) -> torch.Tensor:
    """``out = a @ b + beta * out`` for 2-D ``a`` (m, k) and ``b`` (k, n).

    The fused HVP engine's matrix products go through here. On the CPU, float32 runs through
    the C++ op ``imc_kernels::gemm_out``, which calls the oneDNN matmul inside libtorch rather
    than MKL's sgemm (torch's choice for float32 ``mm``): on AMD processors MKL takes its AVX2
    path, and oneDNN's AVX-512 kernels ran the engine's and the solver's shapes 2.15 times
    faster (median of 24 shapes, 1.3-3.5x; ``benchmarks/gemm.py``, results in
    ``benchmarks/results/cpu-amd-epyc-2c-gemm*.md``). Other dtypes and devices, and a torch without
    oneDNN, use ``torch.mm`` / ``addmm_`` (the twin in ``imc_kernels/reference/gemm.py``).
    ``IMC_CPU_GEMM=torch`` keeps torch's GEMM everywhere (``onednn``, the default, is the
    other value); products under :data:`ONEDNN_MIN_FLOPS` stay on torch's GEMM, where
    oneDNN's per-call setup costs more than it saves. Results agree with ``torch.mm`` to
    float32 rounding, not bitwise. Operands
    that require grad (with grad mode on) also take torch's GEMM, so autograd sees the product.

    Forcing the ``reference`` backend for the ``"gemm"`` family (``IMC_KERNELS_BACKEND=reference``
    or :func:`imc_kernels._dispatch.force_backend`, as the solver's twin does) also keeps
    torch's GEMM. Forcing ``triton`` or ``cext`` leaves GEMMs on the choice above: there is no
    Triton GEMM here (like convolutions, they stay with the vendor libraries).

    Args:
        a: ``(m, k)``; row-major or transposed views are read in place.
        b: ``(k, n)``, same dtype and device.
        out: ``(m, n)`` buffer to write, disjoint from ``a`` and ``b``; a new tensor when None.
        beta: scale of ``out``'s current contents added to the product (0 ignores them,
            NaN included; nonzero needs ``out``).

    Returns:
        ``out``.

    Raises:
        ValueError / TypeError: see :func:`imc_kernels.reference.gemm.check_inputs`.

    Example:
        >>> a, b = torch.ones(2, 3), torch.ones(3, 4)
        >>> gemm(a, b).sum().item()
        24.0
    """
    _ref_gemm.check_inputs(a, b, out, beta)
    if (
        a.device.type == "cpu"
        and a.dtype == torch.float32
        and _cpu_gemm() == "onednn"  # first: it also validates IMC_CPU_GEMM
        and 2 * a.shape[0] * a.shape[1] * b.shape[1] >= ONEDNN_MIN_FLOPS
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        and (_dispatch._forced_for("gemm") or ("",))[0] != "reference"
    ):
        if out is None:
            out = a.new_empty((a.shape[0], b.shape[1]))
        torch.ops.imc_kernels.gemm_out(a, b, beta, out)
        return out
    return _ref_gemm.gemm(a, b, out=out, beta=beta)


CPU_GEMM_ENV = "IMC_CPU_GEMM"

#: Products below this many flops stay on torch's GEMM: oneDNN's per-call setup (~12 us)
#: outweighs its faster kernels there (the threshold and its measurements:
#: ``csrc/gemm/gemm_cpu.cpp``).
ONEDNN_MIN_FLOPS = 1024 * 1024


def _cpu_gemm() -> str:
    """``"onednn"`` or ``"torch"``: which library :func:`gemm` runs float32 CPU products with.

    ``onednn`` unless ``IMC_CPU_GEMM=torch``, oneDNN is switched off in torch
    (``torch.backends.mkldnn.flags(enabled=False)``), the extension lacks ``gemm_out`` (not
    built, or built before it), or libtorch does not export its oneDNN matmul.

    Raises:
        ValueError: ``IMC_CPU_GEMM`` names neither.
    """
    value = os.environ.get(CPU_GEMM_ENV, "onednn").strip().lower() or "onednn"
    if value not in ("onednn", "torch"):
        raise ValueError(f"{CPU_GEMM_ENV}={value!r}: use 'onednn' (the default) or 'torch'")
    if value == "torch" or not torch._C._get_mkldnn_enabled():  # torch.backends.mkldnn.flags
        return "torch"
    return "onednn" if _onednn_matmul_found() else "torch"


@functools.lru_cache(maxsize=1)
def _onednn_matmul_found() -> bool:
    """True when the loaded extension has ``gemm_out`` and it found torch's oneDNN matmul."""
    if _dispatch.cext_unsupported_reason(torch.device("cpu"), "gemm_out") is not None:
        return False
    return bool(torch.ops.imc_kernels.gemm_uses_onednn())


def tsmm_xty(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Tall-skinny ``x.T @ y`` with fp64 accumulation, deterministic.

    Args:
        x: ``(n, m)`` float32 (or float64), ``n`` large, ``m <= 512``.
        y: ``(n, b)`` same dtype and device, ``b <= 512``.

    Returns:
        ``(m, b)`` float64.
    """
    _ref_tsmm.check_inputs(x, y)
    backend = _dispatch.select("tsmm", x.device, x.dtype, available=("cext", "reference"))
    if backend == "cext":
        return torch.ops.imc_kernels.tsmm_xty(x, y)
    return _ref_tsmm.tsmm_xty(x, y)


def _masked_optim_backend(param: torch.Tensor) -> str:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param must be a tensor, got {type(param).__name__}")
    return _dispatch.select(
        "masked_optim", param.device, param.dtype, available=("triton", "reference")
    )


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
    """One masked SGD step over a flat fp32 buffer, as ``torch.optim.SGD`` plus the mask.

    With ``g = grad`` where ``mask`` is nonzero and 0 elsewhere: ``d = g + weight_decay * p``;
    with momentum the buffer becomes ``d`` (``first_step``) or
    ``momentum * buf + (1 - dampening) * d``, and ``d`` becomes ``d + momentum * buf``
    (Nesterov) or ``buf``; then ``p = p - lr * d``. Parameters and buffer are written as 0 on
    pruned entries. All tensors are read flat, so one call updates every parameter packed in
    the buffer.

    Args:
        param: contiguous float32 parameters, updated in place unless ``out_param`` is given.
        grad: the gradient, same size, dtype and device.
        mask: bool or uint8 (nonzero = kept), same size; None for no mask.
        momentum_buffer: float32 momentum state, needed when ``momentum != 0``; updated in
            place unless ``out_momentum_buffer`` is given.
        lr: learning rate.
        momentum: momentum factor.
        dampening: dampening for momentum.
        weight_decay: L2 penalty.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        first_step: the buffer has no state yet (its contents are ignored).
        out_param: optional buffer for the new parameters.
        out_momentum_buffer: optional buffer for the new momentum state.

    Returns:
        ``(param, momentum_buffer or None)``: the buffers written.

    Raises:
        TypeError: non-float32 buffers or a mask that is not bool/uint8.
        ValueError: mismatched sizes or devices, non-contiguous buffers, invalid
            hyperparameters.

    Example:
        >>> p, g = torch.ones(3), torch.ones(3)
        >>> masked_sgd_step(p, g, torch.tensor([True, False, True]), None, lr=0.5)[0]
        tensor([0.5000, 0.0000, 0.5000])
    """
    kwargs = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        first_step=first_step,
        out_param=out_param,
        out_momentum_buffer=out_momentum_buffer,
    )
    if _masked_optim_backend(param) == "triton":
        from imc_kernels.ops import masked_optim as _triton_masked_optim

        return _triton_masked_optim.masked_sgd_step(param, grad, mask, momentum_buffer, **kwargs)
    return _ref_masked_optim.masked_sgd_step(param, grad, mask, momentum_buffer, **kwargs)


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
    """One masked Adam/AdamW step over a flat fp32 buffer, as ``torch.optim.Adam``/``AdamW``.

    With ``g = grad`` where ``mask`` is nonzero and 0 elsewhere: ``p *= 1 - lr * weight_decay``
    (decoupled) or ``g += weight_decay * p`` (L2); ``m = lerp(m, g, 1 - beta1)``;
    ``v = beta2 * v + (1 - beta2) * g * g``;
    ``p -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)``.
    Parameters and moments are written as 0 on pruned entries.

    Args:
        param: contiguous float32 parameters, updated in place unless ``out_param`` is given.
        grad: the gradient, same size, dtype and device.
        mask: bool or uint8 (nonzero = kept), same size; None for no mask.
        exp_avg: first moment, updated in place unless ``out_exp_avg`` is given.
        exp_avg_sq: second moment, updated in place unless ``out_exp_avg_sq`` is given.
        step: the step count after this update (1 on the first step).
        lr: learning rate.
        betas: ``(beta1, beta2)`` in ``[0, 1)``.
        eps: term added to the denominator.
        weight_decay: weight decay (L2, or decoupled with ``decoupled_weight_decay``).
        decoupled_weight_decay: AdamW's decoupled decay.
        out_param: optional buffer for the new parameters.
        out_exp_avg: optional buffer for the new first moment.
        out_exp_avg_sq: optional buffer for the new second moment.

    Returns:
        ``(param, exp_avg, exp_avg_sq)``: the buffers written.

    Raises:
        TypeError: non-float32 buffers or a mask that is not bool/uint8.
        ValueError: mismatched sizes or devices, non-contiguous buffers, invalid
            hyperparameters.

    Example:
        >>> p, g, m, v = torch.ones(2), torch.ones(2), torch.zeros(2), torch.zeros(2)
        >>> masked_adam_step(p, g, torch.tensor([True, False]), m, v, step=1, lr=0.1)[0]
        tensor([0.9000, 0.0000])
    """
    kwargs = dict(
        step=step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        out_param=out_param,
        out_exp_avg=out_exp_avg,
        out_exp_avg_sq=out_exp_avg_sq,
    )
    if _masked_optim_backend(param) == "triton":
        from imc_kernels.ops import masked_optim as _triton_masked_optim

        return _triton_masked_optim.masked_adam_step(
            param, grad, mask, exp_avg, exp_avg_sq, **kwargs
        )
    return _ref_masked_optim.masked_adam_step(param, grad, mask, exp_avg, exp_avg_sq, **kwargs)


def block_orth_step(
    basis: torch.Tensor,
    filled: int,
    block: torch.Tensor,
    work: torch.Tensor,
    q: torch.Tensor,
    coeffs: torch.Tensor,
    coeffs_first: torch.Tensor,
    coupling: torch.Tensor,
    *,
    tau: float,
    prior_norms_sq: torch.Tensor | None = None,
    auto_second_projection: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block orthogonalization step of block Lanczos, written into preallocated outputs.

    BCGS2 with a Cholesky QR inside each pass against ``V = basis[:, :filled]``, every
    projection and Gram accumulated in float64, so that ``W = V C + Q B`` with ``Q``
    orthonormal and orthogonal to ``V``. The math, the rank check and the flags are spelled out
    in :mod:`imc_kernels.reference.block_orth`, the op's pure-PyTorch twin.

    Nothing synchronizes with the host, except with ``auto_second_projection`` (the DGKS
    decision between the passes is read once).

    Args:
        basis: ``(n, >= filled)`` orthonormal columns in its leading ``filled``; any row stride,
            unit column stride (a column slice of the Lanczos buffer is read in place).
        filled: basis columns to project against.
        block: ``(n, b)`` the block ``W``, ``1 <= b <= 512``; overwritten with
            ``W1 = W - V C1``.
        work: ``(n, b)`` scratch (holds ``W2`` afterwards).
        q: ``(n, b)`` receives ``Q`` (``W1`` on a deficient step). May be a column slice of
            the basis buffer outside its first ``filled`` columns.
        coeffs: ``(filled, b)`` float64, receives ``C = C1 + C2 R1`` (``C1`` if deficient).
        coeffs_first: ``(filled, b)`` float64, receives ``C1``.
        coupling: ``(b, b)`` float64, receives ``B = R2 R1`` (zeros if deficient).
        tau: relative rank tolerance (see
            :func:`imc_kernels.linalg.orthogonalize.default_rank_tol`).
        prior_norms_sq: ``(b,)`` float64 squared norms already projected out of the block
            by the caller, added to the rank check's reference norms.
        auto_second_projection: skip the second projection when the DGKS test allows.

    Returns:
        ``(flags, norms)``: ``(5,)`` int32 ``[deficient, non_finite, cholesky info pass 1,
        pass 2, projections]`` and ``(2, b)`` float64 ``[reference; R1_ii / reference]``, on
        the block's device.
    """
    _ref_block_orth.check_inputs(
        basis, filled, block, work, q, coeffs, coeffs_first, coupling, prior_norms_sq, tau
    )
    backend = _dispatch.select(
        "block_orth",
        block.device,
        block.dtype,
        available=("cext", "reference"),
        cext_op="block_orth_step",
    )
    args = (basis, filled, block, work, q, coeffs, coeffs_first, coupling, prior_norms_sq)
    if backend == "cext":
        return torch.ops.imc_kernels.block_orth_step(
            *args, float(tau), bool(auto_second_projection)
        )
    return _ref_block_orth.block_orth_step(*args, float(tau), bool(auto_second_projection))


def lanczos_vector_step(
    rows: torch.Tensor,
    filled: int,
    local: int,
    w: torch.Tensor,
    *,
    tau: float,
    product_out: torch.Tensor | None = None,
    auto_second_projection: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of single-vector Lanczos against a basis stored one vector per row.

    The local pass against ``rows[filled - local : filled]``, the full projection against
    ``V = rows[:filled]`` (a second one when the DGKS test asks, or always without
    ``auto_second_projection``) and the normalization into ``rows[filled]``, every dot product
    accumulated in float64: :func:`block_orthonormalize` with ``b = 1`` after a local pass, in
    four passes over the vector. The math, rank check and flags are spelled out in
    :mod:`imc_kernels.reference.lanczos_vector`, the op's pure-PyTorch twin; the compiled
    kernel runs on the CPU (the only device where the solver stores its basis this way).

    Args:
        rows: ``(R, n)`` with contiguous rows; ``rows[:filled]`` orthonormal; row ``filled``
            receives the next vector (``W1`` on a deficient step).
        filled: vectors in the basis, ``0 <= filled < R``.
        local: trailing basis vectors projected out first, ``0 <= local <= filled``.
        w: ``(n,)`` contiguous, ``H v_{filled-1}``; overwritten with ``W1``.
        tau: relative rank tolerance.
        product_out: optional ``(n,)`` contiguous buffer that receives ``w`` as passed.
        auto_second_projection: skip the second projection when the DGKS test allows.

    Returns:
        ``(coeffs, coupling, flags, norms)``: ``(filled,)`` and ``()`` float64, ``(5,)`` int32
        ``[deficient, non_finite, info pass 1, info pass 2, projections]``, ``(2,)`` float64
        ``[reference, r1 / reference]``.
    """
    _ref_lanczos_vector.check_inputs(rows, filled, local, w, product_out, tau)
    available = ("cext", "reference") if w.device.type == "cpu" else ("reference",)
    backend = _dispatch.select(
        "lanczos_vector",
        w.device,
        w.dtype,
        available=available,
        cext_op="lanczos_vector_step",
    )
    args = (rows, filled, local, w, product_out, float(tau), bool(auto_second_projection))
    if backend == "cext":
        return torch.ops.imc_kernels.lanczos_vector_step(*args)
    return _ref_lanczos_vector.lanczos_vector_step(*args)


def ritz_vectors(
    basis: torch.Tensor,
    products: torch.Tensor | None,
    s: torch.Tensor,
    theta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Ritz vectors ``X = V S`` of a finished solve and, from the stored products
    ``P = H V``, the squared residual norms ``||P s_i - theta_i x_i||^2``, in one pass.

    Args:
        basis: ``V``, ``(n, m)``, float32 or float64, any strides (row- or column-major).
        products: ``P``, shaped and typed like ``basis``, or None (then no residuals).
        s: ``(m, k)`` float64 Ritz coefficients.
        theta: ``(k,)`` float64 Ritz values.

    Returns:
        ``(X, squares)``: ``(n, k)`` contiguous in the basis dtype, and ``(k,)`` float64
        (empty without ``products``). The math is :mod:`imc_kernels.reference.ritz`, the op's
        twin; the compiled kernel runs on the CPU (elsewhere the twin, two GEMMs).
    """
    _ref_ritz.check_inputs(basis, products, s, theta)
    available = ("cext", "reference") if basis.device.type == "cpu" else ("reference",)
    backend = _dispatch.select(
        "ritz", basis.device, basis.dtype, available=available, cext_op="ritz_vectors"
    )
    if backend == "cext":
        return torch.ops.imc_kernels.ritz_vectors(basis, products, s.cpu(), theta.cpu())
    return _ref_ritz.ritz_vectors(basis, products, s, theta)


# --- Block-sparse linear products (ops/block_sparse.py, reference/block_sparse.py) -----------


def block_sparse_backend(tensor: torch.Tensor, layout) -> str:
    """The backend that runs the block-sparse products for ``tensor``'s device and dtype.

    Triton where :func:`imc_kernels._dispatch.select` allows it and the kernels take the
    layout's block size and the dtype (:data:`imc_kernels.reference.block_sparse.
    TRITON_BLOCK_SIZES`, ``TRITON_DTYPES``); else the pure-PyTorch twin.

    Raises:
        BackendUnavailableError: ``IMC_KERNELS_BACKEND`` forces a backend that cannot run.
    """
    from imc_kernels.reference import block_sparse as _ref_block_sparse

    limitation = _ref_block_sparse.triton_unsupported_reason(layout, tensor.dtype)
    if limitation is not None:
        if _dispatch.forced_backend() == "triton":
            raise _dispatch.BackendUnavailableError(
                f"{_dispatch.ENV_BACKEND}=triton cannot run op 'block_sparse': {limitation}"
            )
        return _dispatch.select(
            "block_sparse", tensor.device, tensor.dtype, available=("reference",)
        )
    return _dispatch.select(
        "block_sparse", tensor.device, tensor.dtype, available=("triton", "reference")
    )


def block_sparse_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x (W * mask)^T + b`` from the kept tiles of a block mask only.

    Args:
        x: ``(M, in_features)``.
        weight: dense ``(out_features, in_features)``; its pruned tiles are never read.
        bias: ``(out_features,)`` or None.
        layout: a :class:`imc_kernels.reference.block_sparse.BlockLayout` on the weight's
            device.
        out: optional contiguous ``(M, out_features)`` buffer.

    Returns:
        ``(M, out_features)``.

    Raises:
        TypeError, ValueError: see
            :func:`imc_kernels.reference.block_sparse.check_forward_inputs`.

    Example:
        >>> from imc_kernels.reference.block_sparse import block_layout
        >>> layout = block_layout(torch.tensor([[True, False]]), 2)
        >>> block_sparse_forward(torch.ones(1, 4), torch.ones(2, 4), None, layout)
        tensor([[2., 2.]])
    """
    from imc_kernels.reference import block_sparse as _ref_block_sparse

    _ref_block_sparse.check_forward_inputs(x, weight, bias, layout, out)
    if block_sparse_backend(weight, layout) == "triton":
        from imc_kernels.ops import block_sparse as _triton_block_sparse

        return _triton_block_sparse.block_sparse_forward(x, weight, bias, layout, out=out)
    return _ref_block_sparse.block_sparse_forward(x, weight, bias, layout, out=out)


def block_sparse_grad_input(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    layout,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dx = dy (W * mask)`` from the kept tiles only.

    Args:
        grad_output: ``(M, out_features)``.
        weight: dense ``(out_features, in_features)``.
        layout: the kept tiles (a ``BlockLayout``).
        out: optional contiguous ``(M, in_features)`` buffer.

    Returns:
        ``(M, in_features)``.

    Raises:
        TypeError, ValueError: see
            :func:`imc_kernels.reference.block_sparse.check_grad_input_inputs`.
    """
    from imc_kernels.reference import block_sparse as _ref_block_sparse

    _ref_block_sparse.check_grad_input_inputs(grad_output, weight, layout, out)
    if block_sparse_backend(weight, layout) == "triton":
        from imc_kernels.ops import block_sparse as _triton_block_sparse

        return _triton_block_sparse.block_sparse_grad_input(grad_output, weight, layout, out=out)
    return _ref_block_sparse.block_sparse_grad_input(grad_output, weight, layout, out=out)


def block_sparse_grad_weight(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    layout,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dW = (dy^T x) * mask``: computed on kept tiles only, returned dense with exact zeros
    on pruned tiles.

    Args:
        grad_output: ``(M, out_features)``.
        x: the forward's input, ``(M, in_features)``.
        layout: the kept tiles (a ``BlockLayout``).
        out: optional contiguous ``(out_features, in_features)`` buffer.

    Returns:
        ``(out_features, in_features)``.

    Raises:
        TypeError, ValueError: see
            :func:`imc_kernels.reference.block_sparse.check_grad_weight_inputs`.
    """
    from imc_kernels.reference import block_sparse as _ref_block_sparse

    _ref_block_sparse.check_grad_weight_inputs(grad_output, x, layout, out)
    if block_sparse_backend(x, layout) == "triton":
        from imc_kernels.ops import block_sparse as _triton_block_sparse

        return _triton_block_sparse.block_sparse_grad_weight(grad_output, x, layout, out=out)
    return _ref_block_sparse.block_sparse_grad_weight(grad_output, x, layout, out=out)
