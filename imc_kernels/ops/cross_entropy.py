"""Fused softmax cross-entropy for block HVPs (Triton).

Per row ``n`` with logits ``z``, target ``t`` and ``p = softmax(z)`` (kernel_design.md 2.2,
kernel 3), from one read of the logits:

* ``loss[n] = logsumexp(z) - z[t]`` (unscaled),
* ``grad[n] = scale * (p - onehot(t))``,
* ``rgrad[i, n] = scale * (p * u_i - p * (p . u_i))`` for each tangent ``u_i = tangents[i, n]``
  (the Hessian ``diag(p) - p p^T`` applied to ``u_i``).

Rows whose target equals ``ignore_index`` get zeros everywhere. Up to ``_MAX_BLOCK_C`` classes a
row tile stays in registers and several rows share a program (small class counts such as 10
would otherwise leave most lanes idle); wider rows are walked in chunks with an online softmax,
as in Liger-Kernel's ``ops/cross_entropy.py``. The twin is
``imc_kernels/reference/cross_entropy.py``.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

# Widest row kept whole in registers: 8192 fp32 over 16 warps is 16 values per thread per
# operand (p and one tangent live at once); an sm_90 build uses 114 registers, no spills. Wider
# rows take the chunked path, which reads the logits 2 + 2b times and each tangent twice
# (against once each here), since p . u needs the whole row before the first write.
_MAX_BLOCK_C = 8192
# Row tile of the single-tile path (BLOCK_N * BLOCK_C elements): enough rows per program that
# 10-class problems fill a few warps' worth of lanes.
_TILE_ELEMENTS = 4096


@triton.jit
def _cross_entropy_hvp_kernel(
    logits_ptr,
    target_ptr,
    tangents_ptr,
    loss_ptr,
    grad_ptr,
    rgrad_ptr,
    n_rows,
    n_classes,
    tangent_stride,
    n_tangents,
    ignore_index,
    scale_hi,
    scale_lo,
    WRITE_PRIMAL: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    target = tl.load(target_ptr + rows, mask=row_in, other=ignore_index)
    valid = row_in & (target != ignore_index)
    cols = tl.arange(0, BLOCK_C)
    row_offsets = rows[:, None] * n_classes
    # Scalar arguments arrive as fp32; hi + lo carries the scale exactly into fp64 runs.
    scale = tl.cast(scale_hi, COMPUTE_DTYPE) + tl.cast(scale_lo, COMPUTE_DTYPE)
    neg_inf = float("-inf")
    # Every loop with a runtime bound is a while loop: the Triton 3.6 interpreter converts a
    # `range` bound with int() of a 1-element array, which numpy >= 2.3 rejects.

    if SINGLE_TILE:
        col_in = cols[None, :] < n_classes
        # Ignored rows are never read: their lanes see -inf, hence p = 0 below, and every
        # output of the row comes out as an exact zero without a separate branch.
        load_mask = valid[:, None] & col_in
        store_mask = row_in[:, None] & col_in
        offsets = row_offsets + cols[None, :]
        z = tl.load(logits_ptr + offsets, mask=load_mask, other=neg_inf).to(COMPUTE_DTYPE)
        row_max = tl.max(z, axis=1)
        # An all -inf row (ignored, or masked out) would give exp(-inf - -inf) = NaN.
        row_max = tl.where(row_max == neg_inf, 0.0, row_max)
        e = tl.exp(z - row_max[:, None])
        denom = tl.where(valid, tl.sum(e, axis=1), 1.0)
        p = e / denom[:, None]
        if WRITE_PRIMAL:
            onehot = (cols[None, :] == target[:, None]) & valid[:, None]
            z_target = tl.sum(tl.where(onehot, z, 0.0), axis=1)
            loss = tl.where(valid, row_max + tl.log(denom) - z_target, 0.0)
            tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_in)
            grad = scale * (p - tl.where(onehot, 1.0, 0.0))
            tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=store_mask)
        # p stays in registers: each tangent costs one read and one write of its row.
        tangent_ptrs = tangents_ptr + offsets
        rgrad_ptrs = rgrad_ptr + offsets
        i = 0
        while i < n_tangents:
            u = tl.load(tangent_ptrs, mask=load_mask, other=0.0).to(COMPUTE_DTYPE)
            pu = p * u
            p_dot_u = tl.sum(pu, axis=1)
            rgrad = scale * (pu - p * p_dot_u[:, None])
            tl.store(rgrad_ptrs, rgrad.to(rgrad_ptr.dtype.element_ty), mask=store_mask)
            tangent_ptrs += tangent_stride
            rgrad_ptrs += tangent_stride
            i += 1
    else:
        # Pass 1: online max and normaliser (Milakov & Gimelshein 2018), plus z[target].
        row_max = tl.full([BLOCK_N], neg_inf, COMPUTE_DTYPE)
        denom = tl.zeros([BLOCK_N], COMPUTE_DTYPE)
        z_target = tl.zeros([BLOCK_N], COMPUTE_DTYPE)
        start = 0
        while start < n_classes:
            chunk = start + cols[None, :]
            load_mask = valid[:, None] & (chunk < n_classes)
            z = tl.load(logits_ptr + row_offsets + chunk, mask=load_mask, other=neg_inf)
            z = z.to(COMPUTE_DTYPE)
            new_max = tl.maximum(row_max, tl.max(z, axis=1))
            # Shift by 0 while everything seen is -inf, so no exp(-inf - -inf) = NaN appears.
            shift = tl.where(new_max == neg_inf, 0.0, new_max)
            denom = denom * tl.exp(row_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
            row_max = new_max
            onehot = (chunk == target[:, None]) & valid[:, None]
            z_target += tl.sum(tl.where(onehot, z, 0.0), axis=1)
            start += BLOCK_C
        row_max = tl.where(row_max == neg_inf, 0.0, row_max)
        denom = tl.where(valid, denom, 1.0)
        if WRITE_PRIMAL:
            loss = tl.where(valid, row_max + tl.log(denom) - z_target, 0.0)
            tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_in)
            start = 0
            while start < n_classes:
                chunk = start + cols[None, :]
                col_in = chunk < n_classes
                z = tl.load(
                    logits_ptr + row_offsets + chunk, mask=valid[:, None] & col_in, other=neg_inf
                ).to(COMPUTE_DTYPE)
                p = tl.exp(z - row_max[:, None]) / denom[:, None]
                onehot = (chunk == target[:, None]) & valid[:, None]
                grad = scale * (p - tl.where(onehot, 1.0, 0.0))
                tl.store(
                    grad_ptr + row_offsets + chunk,
                    grad.to(grad_ptr.dtype.element_ty),
                    mask=row_in[:, None] & col_in,
                )
                start += BLOCK_C
        # Per tangent, one pass for p . u and one to write: p is recomputed from the logits
        # rather than stored, which would cost a write and a read of the same size.
        tangent_row_ptrs = tangents_ptr + row_offsets
        rgrad_row_ptrs = rgrad_ptr + row_offsets
        i = 0
        while i < n_tangents:
            p_dot_u = tl.zeros([BLOCK_N], COMPUTE_DTYPE)
            start = 0
            while start < n_classes:
                chunk = start + cols[None, :]
                load_mask = valid[:, None] & (chunk < n_classes)
                z = tl.load(logits_ptr + row_offsets + chunk, mask=load_mask, other=neg_inf)
                p = tl.exp(z.to(COMPUTE_DTYPE) - row_max[:, None]) / denom[:, None]
                u = tl.load(tangent_row_ptrs + chunk, mask=load_mask, other=0.0)
                p_dot_u += tl.sum(p * u.to(COMPUTE_DTYPE), axis=1)
                start += BLOCK_C
            start = 0
            while start < n_classes:
                chunk = start + cols[None, :]
                col_in = chunk < n_classes
                load_mask = valid[:, None] & col_in
                z = tl.load(logits_ptr + row_offsets + chunk, mask=load_mask, other=neg_inf)
                p = tl.exp(z.to(COMPUTE_DTYPE) - row_max[:, None]) / denom[:, None]
                u = tl.load(tangent_row_ptrs + chunk, mask=load_mask, other=0.0)
                rgrad = scale * (p * u.to(COMPUTE_DTYPE) - p * p_dot_u[:, None])
                tl.store(
                    rgrad_row_ptrs + chunk,
                    rgrad.to(rgrad_ptr.dtype.element_ty),
                    mask=row_in[:, None] & col_in,
                )
                start += BLOCK_C
            tangent_row_ptrs += tangent_stride
            rgrad_row_ptrs += tangent_stride
            i += 1


def _split_float(value: float) -> tuple[float, float]:
    """``value = hi + lo`` with both parts exact in fp32 (Triton passes float scalars as fp32)."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, struct.unpack("f", struct.pack("f", value - hi))[0]


def _output(
    out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor, name: str
) -> torch.Tensor:
    """``out`` after checking it can take the result, or a fresh contiguous tensor."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != like.dtype or out.device != like.device:
        raise TypeError(
            f"{name} ({out.dtype}, {out.device}) must match the logits ({like.dtype}, "
            f"{like.device})"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def _launch_config(n_rows: int, n_classes: int) -> tuple[int, int, bool, int]:
    """``(BLOCK_N, BLOCK_C, SINGLE_TILE, num_warps)`` for a ``(n_rows, n_classes)`` problem.

    Reads the module constants at call time, so tests can shrink ``_MAX_BLOCK_C`` to drive
    the chunked path with small rows.
    """
    single_tile = n_classes <= _MAX_BLOCK_C
    block_c = triton.next_power_of_2(n_classes) if single_tile else _MAX_BLOCK_C
    block_n = 1
    if single_tile:
        block_n = max(1, min(triton.next_power_of_2(n_rows), _TILE_ELEMENTS // block_c))
    tile = block_n * block_c
    # Untuned: about 16 fp32 values per thread per live tile.
    num_warps = 4 if tile <= 2048 else 8 if tile <= 4096 else 16
    return block_n, block_c, single_tile, num_warps


def cross_entropy_hvp(
    logits: torch.Tensor,
    target: torch.Tensor,
    tangents: torch.Tensor,
    *,
    scale: float,
    ignore_index: int = -100,
    write_primal: bool = True,
    out_loss: torch.Tensor | None = None,
    out_grad: torch.Tensor | None = None,
    out_tangents: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Triton launcher of :func:`imc_kernels.ops.cross_entropy_hvp` (inputs checked there).

    Targets outside ``[0, C)`` that are not ``ignore_index`` are never used as addresses (the
    kernel compares class indices, it does not gather), so unchecked input cannot read out of
    bounds; such a row gets the loss ``logsumexp`` and no one-hot.

    Args:
        logits: ``(N, C)``.
        target: ``(N,)`` integer class indices.
        tangents: ``(b, N, C)`` tangents of the logits, ``b`` may be 0.
        scale: weight of each row in the reduced loss (``1/N`` for a mean).
        ignore_index: target value that marks a row to ignore.
        write_primal: also compute the row losses and ``grad``.
        out_loss: optional contiguous ``(N,)`` buffer for the row losses.
        out_grad: optional contiguous ``(N, C)`` buffer for ``grad``.
        out_tangents: optional contiguous ``(b, N, C)`` buffer for ``rgrad``.

    Returns:
        ``(row_loss or None, grad or None, rgrad)``, all in the dtype of ``logits``.
    """
    if not write_primal and (out_loss is not None or out_grad is not None):
        raise ValueError("out_loss/out_grad were given but write_primal=False")
    n_rows, n_classes = logits.shape
    n_tangents = tangents.shape[0]
    logits = logits.contiguous()
    tangents = tangents.contiguous()
    # int64 targets: comparing an unsigned target with a negative ignore_index is an error in
    # Triton, and the copy is N elements.
    target = target.to(torch.int64).contiguous()
    loss = grad = None
    if write_primal:
        loss = _output(out_loss, (n_rows,), logits, "out_loss")
        grad = _output(out_grad, (n_rows, n_classes), logits, "out_grad")
    rgrad = _output(out_tangents, tuple(tangents.shape), logits, "out_tangents")
    if n_rows == 0 or n_classes == 0 or (n_tangents == 0 and not write_primal):
        if loss is not None:
            loss.zero_()
        return loss, grad, rgrad
    block_n, block_c, single_tile, num_warps = _launch_config(n_rows, n_classes)
    scale_hi, scale_lo = _split_float(float(scale))
    # Without WRITE_PRIMAL the loss and grad pointers are never dereferenced.
    _cross_entropy_hvp_kernel[(triton.cdiv(n_rows, block_n),)](
        logits,
        target,
        tangents,
        loss if write_primal else rgrad,
        grad if write_primal else rgrad,
        rgrad,
        n_rows,
        n_classes,
        n_rows * n_classes,
        n_tangents,
        int(ignore_index),
        scale_hi,
        scale_lo,
        WRITE_PRIMAL=write_primal,
        SINGLE_TILE=single_tile,
        COMPUTE_DTYPE=tl.float64 if logits.dtype == torch.float64 else tl.float32,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return loss, grad, rgrad
