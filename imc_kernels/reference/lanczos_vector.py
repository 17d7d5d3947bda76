"""Pure-PyTorch twin of the ``imc_kernels::lanczos_vector_step`` C++ op
(``csrc/lanczos/lanczos_vector_cpu.cpp``).

One step of single-vector Lanczos with full reorthogonalization against a basis stored one
vector per row (``rows``, the CPU solver's transposed basis). With ``V = rows[:filled]``,
``V_loc = rows[filled - local : filled]`` (the previous and the current vector of the
recurrence) and ``w = H v_{filled-1}``::

    product_out = w                                      (when given)
    l  = V_loc^T w;   w -= V_loc^T l                     (the local pass)
    C1 = V^T w;       W1 = w - V^T C1  (-> w);  r1 = ||W1||
    C2 = V^T W1;      q = W1 - V^T C2                    (only when the DGKS test asks)
    rows[filled] = q / ||q||                             (q = W1 without a second projection)

Every dot product is accumulated in float64 (here by upcasting), the coefficients are rounded
to the working dtype once for the updates. The step equals
:func:`imc_kernels.linalg.orthogonalize.block_orthonormalize` with ``b = 1`` after a local
pass, up to rounding, with the same flags and rank check:

* ``reference = sqrt(||l||^2 + ||C1||^2 + r1^2)``, the norm of ``w`` before the call;
* *deficient* when ``r1 <= tau * reference`` (also for NaN) or the final norm is not positive;
  a deficient step writes ``W1`` to ``rows[filled]``, ``l + C1`` to the coefficients and 0 to
  the coupling (the raw residual for the caller's repair);
* ``auto_second_projection``: the second projection runs only when
  ``r1 / sqrt(||C1||^2 + r1^2) <= 1/sqrt(2)`` (DGKS), else always (when ``filled > 0``).

Returns ``(coeffs, coupling, flags, norms)``: ``(filled,)`` float64 ``l + C1 (+ C2)`` at the
rows of ``V``; ``()`` float64 ``||q||``; ``(5,)`` int32 ``[deficient, non_finite, info pass 1,
info pass 2, projections]``; ``(2,)`` float64 ``[reference, r1 / reference]``.
"""

from __future__ import annotations

import math

import torch

DGKS_ETA = 0.7071067811865476


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory ranges of ``a`` and ``b`` (as spanned by their strides) intersect."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    size = a.element_size()

    def span(t):
        start = t.storage_offset() * size
        extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
        return start, start + extent * size

    a_start, a_end = span(a)
    b_start, b_end = span(b)
    return a_start < b_end and b_start < a_end


def check_inputs(
    rows: torch.Tensor,
    filled: int,
    local: int,
    w: torch.Tensor,
    product_out: torch.Tensor | None,
    tau: float,
) -> None:
    """Validate the arguments of :func:`lanczos_vector_step` (the op's checks, as Python errors).

    Raises:
        ValueError: shapes or layouts, ``filled``/``local`` out of range, buffers sharing
            memory, a bad ``tau``.
        TypeError: a dtype other than float32/float64, mixed dtypes or devices.
    """
    if w.dim() != 1 or w.shape[0] < 1 or w.stride(0) != 1:
        raise ValueError(
            f"lanczos_vector_step needs a contiguous 1-D vector w, got shape {tuple(w.shape)} "
            f"and strides {w.stride()}"
        )
    n = w.shape[0]
    if (
        rows.dim() != 2
        or rows.shape[1] != n
        or rows.stride(1) != 1
        or (rows.shape[0] > 1 and rows.stride(0) < n)
    ):
        raise ValueError(
            f"lanczos_vector_step needs rows (R, {n}) with contiguous rows (the basis stored one "
            f"vector per row), got shape {tuple(rows.shape)} and strides {rows.stride()}"
        )
    if isinstance(filled, bool) or not isinstance(filled, int) or not 0 <= filled < rows.shape[0]:
        raise ValueError(
            f"filled = {filled!r} must be an integer from 0 to {rows.shape[0] - 1} (row `filled` "
            "receives the next vector)"
        )
    if isinstance(local, bool) or not isinstance(local, int) or not 0 <= local <= filled:
        raise ValueError(f"local = {local!r} must be an integer from 0 to filled = {filled}")
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    if w.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"lanczos_vector_step takes float32 or float64, got {w.dtype}")
    if rows.dtype != w.dtype:
        raise TypeError(f"rows ({rows.dtype}) must have w's dtype {w.dtype}")
    if rows.device != w.device:
        raise TypeError(f"rows is on {rows.device}, w on {w.device}")
    named = {"rows": rows, "w": w}
    if product_out is not None:
        if (
            product_out.dim() != 1
            or product_out.shape[0] != n
            or product_out.stride(0) != 1
            or product_out.dtype != w.dtype
            or product_out.device != w.device
        ):
            raise ValueError(
                f"product_out must be a contiguous ({n},) {w.dtype} vector on {w.device}, got "
                f"shape {tuple(product_out.shape)} {product_out.dtype} on {product_out.device}"
            )
        named["product_out"] = product_out
    names = list(named)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            if _shares_memory(named[first], named[second]):
                raise ValueError(
                    f"{first} and {second} share memory; they must be separate buffers"
                )


def lanczos_vector_step(
    rows: torch.Tensor,
    filled: int,
    local: int,
    w: torch.Tensor,
    product_out: torch.Tensor | None,
    tau: float,
    auto_second_projection: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`imc_kernels.ops.lanczos_vector_step` (the module docstring has the
    math). Overwrites ``w`` (with ``W1``), ``rows[filled]`` and ``product_out``."""
    f64, dtype, device = torch.float64, w.dtype, w.device
    v = rows[:filled]
    v_local = rows[filled - local : filled]
    if product_out is not None:
        product_out.copy_(w)
    local_coeffs = v_local.to(f64) @ w.to(f64)
    for i in range(local):
        w.sub_(v_local[i] * local_coeffs[i].to(dtype))
    c1 = v.to(f64) @ w.to(f64)
    if filled:
        w.sub_(c1.to(dtype) @ v)
    g1 = w.to(f64).square().sum()
    norms_sq = (c1.square().sum() + g1).clamp_min(0)
    reference = (norms_sq + local_coeffs.square().sum()).sqrt()
    non_finite = not bool(torch.isfinite(reference))
    info_first = 0 if bool(g1 > 0) else 1
    r1 = g1.sqrt() if info_first == 0 else torch.zeros((), dtype=f64, device=device)
    deficient = info_first != 0 or not bool(r1 > tau * reference)
    project_twice = filled > 0
    if project_twice and auto_second_projection:
        project_twice = not bool(r1 / norms_sq.sqrt() > DGKS_ETA)
    coeffs = c1.clone()
    coupling = r1
    q = w
    info_second = info_first
    if project_twice:
        c2 = v.to(f64) @ w.to(f64)
        q = w - c2.to(dtype) @ v
        g2 = q.to(f64).square().sum()
        info_second = 0 if bool(g2 > 0) else 1
        coupling = g2.sqrt() if info_second == 0 else torch.zeros((), dtype=f64, device=device)
        coeffs += c2
    deficient = deficient or info_second != 0
    if deficient:
        rows[filled] = w
        coeffs = c1.clone()
        coupling = torch.zeros((), dtype=f64, device=device)
    else:
        rows[filled] = q * (1.0 / coupling).to(dtype)
    coeffs[filled - local :] += local_coeffs
    projections = 0 if filled == 0 else (2 if project_twice else 1)
    flags = torch.tensor(
        [int(deficient), int(non_finite), info_first, info_second, projections],
        dtype=torch.int32,
        device=device,
    )
    ratio = r1 / reference
    return coeffs, coupling, flags, torch.stack((reference, ratio))
