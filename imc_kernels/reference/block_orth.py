"""Pure-PyTorch twin of the ``imc_kernels::block_orth_step`` C++/CUDA op (``csrc/lanczos/``).

One block orthogonalization step of block Lanczos: BCGS2 with a Cholesky QR inside each pass
(see :func:`imc_kernels.linalg.orthogonalize.block_orthonormalize` for why this order). With
``V = basis[:, :filled]`` and the block ``W`` (n, b)::

    pass 1:  C1 = V^T W;   W1 = W - V C1   (-> block);   W1 = Q1 R1   (Q1 -> work)
    pass 2:  C2 = V^T Q1;  W2 = Q1 - V C2  (-> work);    W2 = Q R2    (Q  -> q)
    W = V C + Q B,  C = C1 + C2 R1  (-> coeffs),  B = R2 R1  (-> coupling),  C1 -> coeffs_first

Every projection and Gram is accumulated in float64 (here by upcasting the operands), the
``b x b`` factors are float64, and only the tall products run in the working dtype.

Rank check: the step is *deficient* when a Cholesky fails or some ``R1_ii <= tau * ref_i``
with ``ref_i = sqrt(||w_i||^2 + prior_norms_sq_i)`` (``||w_i||`` the column's norm before the
call). A deficient step leaves the raw residual for the caller's repair: ``q = W1``,
``coeffs = C1``, ``coupling = 0``. A failed Cholesky stops at the first non-positive pivot; the
rows from there on become identity rows (their diagonal counts as 0), the convention of
``csrc/lanczos/block_orth_factor.h``, so later products stay finite.

``auto_second_projection``: pass 2 projects only when some ``R1_ii / ||w_i|| <= 1/sqrt(2)``
(the DGKS test); its Cholesky QR always runs. Reading the test synchronizes with the host.

Returns ``(flags, norms)`` on the block's device: ``flags`` ``(5,)`` int32
``[deficient, non_finite, cholesky info of pass 1, of pass 2, projections]`` (projections
against the basis: 0 when ``filled`` is 0, else 1 or 2) and ``norms`` ``(2, b)`` float64
``[reference; R1_ii / reference]``.
"""

from __future__ import annotations

import math

import torch

MAX_BLOCK = 512
DGKS_ETA = 0.7071067811865476

FLAG_DEFICIENT = 0
FLAG_NON_FINITE = 1
FLAG_INFO_FIRST = 2
FLAG_INFO_SECOND = 3
FLAG_PROJECTIONS = 4


def rows_addressable(t: torch.Tensor) -> bool:
    """Element ``(r, c)`` of the 2-D ``t`` sits at ``r * t.stride(0) + c`` (no copy needed).

    True for row-major matrices and their column slices (any row stride, unit column stride),
    the layouts the compiled op reads and writes in place.
    """
    if t.dim() != 2:
        return False
    rows, cols = t.shape
    return (cols <= 1 or t.stride(1) == 1) and (rows <= 1 or t.stride(0) >= max(cols, 1))


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Dense tensors whose memory ranges intersect (strided views are not judged: the op's
    callers pass disjoint column slices of one buffer)."""
    if a.numel() == 0 or b.numel() == 0 or not (a.is_contiguous() and b.is_contiguous()):
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a_start, b_start = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
    a_end, b_end = a_start + a.numel() * a.element_size(), b_start + b.numel() * b.element_size()
    return a_start < b_end and b_start < a_end


def check_inputs(
    basis: torch.Tensor,
    filled: int,
    block: torch.Tensor,
    work: torch.Tensor,
    q: torch.Tensor,
    coeffs: torch.Tensor,
    coeffs_first: torch.Tensor,
    coupling: torch.Tensor,
    prior_norms_sq: torch.Tensor | None,
    tau: float,
) -> None:
    """Validate the arguments of :func:`block_orth_step` (the op's checks, as Python errors).

    Raises:
        ValueError: shapes, ``filled`` out of range, a block wider than 512 columns, a layout
            the op cannot address in place, outputs sharing memory, or a bad ``tau``.
        TypeError: dtypes other than float32/float64 for the tall tensors or float64 for the
            small ones, or tensors on different devices.
    """
    if block.dim() != 2:
        raise ValueError(
            f"block_orth_step needs a 2-D block (n, b), got shape {tuple(block.shape)}"
        )
    n, b = block.shape
    if n < 1 or not 1 <= b <= MAX_BLOCK:
        raise ValueError(
            f"block_orth_step needs a block with at least one row and 1 to {MAX_BLOCK} columns, "
            f"got {tuple(block.shape)}; orthonormalize a wider block in column blocks"
        )
    if basis.dim() != 2 or basis.shape[0] != n:
        raise ValueError(
            f"block_orth_step needs a 2-D basis with {n} rows (the block's), got "
            f"{tuple(basis.shape)}"
        )
    if isinstance(filled, bool) or not isinstance(filled, int) or not 0 <= filled <= basis.shape[1]:
        raise ValueError(
            f"filled = {filled!r} must be an integer between 0 and the basis's column count "
            f"{basis.shape[1]}"
        )
    if tuple(work.shape) != (n, b) or tuple(q.shape) != (n, b):
        raise ValueError(
            f"work and q must be shaped like the block {(n, b)}, got {tuple(work.shape)} and "
            f"{tuple(q.shape)}"
        )
    if tuple(coeffs.shape) != (filled, b) or tuple(coeffs_first.shape) != (filled, b):
        raise ValueError(
            f"coeffs and coeffs_first must have shape (filled, b) = {(filled, b)}, got "
            f"{tuple(coeffs.shape)} and {tuple(coeffs_first.shape)}"
        )
    if tuple(coupling.shape) != (b, b):
        raise ValueError(f"coupling must have shape (b, b) = {(b, b)}, got {tuple(coupling.shape)}")
    if prior_norms_sq is not None and tuple(prior_norms_sq.shape) != (b,):
        raise ValueError(
            f"prior_norms_sq must have shape (b,) = ({b},), got {tuple(prior_norms_sq.shape)}"
        )
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    if block.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"block_orth_step takes a float32 or float64 block, got {block.dtype}")
    tall = {"basis": basis, "work": work, "q": q}
    for name, t in tall.items():
        if t.dtype != block.dtype:
            raise TypeError(f"{name} ({t.dtype}) must have the block's dtype {block.dtype}")
    small = {"coeffs": coeffs, "coeffs_first": coeffs_first, "coupling": coupling}
    if prior_norms_sq is not None:
        small["prior_norms_sq"] = prior_norms_sq
    for name, t in small.items():
        if t.dtype != torch.float64:
            raise TypeError(f"{name} must be float64, got {t.dtype}")
    for name, t in {**tall, **small}.items():
        if t.device != block.device:
            raise TypeError(f"{name} is on {t.device}, the block on {block.device}")
    addressed = {"block": block, **tall, "coeffs": coeffs, "coeffs_first": coeffs_first}
    addressed["coupling"] = coupling
    for name, t in addressed.items():
        if not rows_addressable(t):
            raise ValueError(
                f"block_orth_step needs {name} with unit column stride and a row stride of at "
                f"least its width, got strides {t.stride()}; pass a .contiguous() copy"
            )
    pairs = [("block", "work"), ("block", "q"), ("work", "q"), ("basis", "block")]
    pairs += [("basis", "work"), ("coeffs", "coeffs_first")]
    named = {"block": block, **tall, "coeffs": coeffs, "coeffs_first": coeffs_first}
    for first, second in pairs:
        if _overlaps(named[first], named[second]):
            raise ValueError(f"{first} and {second} share memory; they must be separate buffers")


def _cholesky(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(R, diag, info)``: ``gram = R^T R`` with the op's failure convention (module doc)."""
    b = gram.shape[0]
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)
    index = torch.arange(b, device=gram.device)
    failed_rows = (info > 0) & (index >= info - 1)
    eye = torch.eye(b, dtype=gram.dtype, device=gram.device)
    factor = torch.where(failed_rows[:, None], eye, factor.triu())
    diagonal = torch.where(
        failed_rows, torch.zeros_like(index, dtype=gram.dtype), factor.diagonal()
    )
    return factor, diagonal, info


def block_orth_step(
    basis: torch.Tensor,
    filled: int,
    block: torch.Tensor,
    work: torch.Tensor,
    q: torch.Tensor,
    coeffs: torch.Tensor,
    coeffs_first: torch.Tensor,
    coupling: torch.Tensor,
    prior_norms_sq: torch.Tensor | None,
    tau: float,
    auto_second_projection: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`imc_kernels.ops.block_orth_step` (the module docstring has the math).

    Overwrites ``block`` (with ``W1``), ``work``, ``q``, ``coeffs``, ``coeffs_first`` and
    ``coupling``; returns ``(flags, norms)``.
    """
    f64, dtype, device = torch.float64, block.dtype, block.device
    b = block.shape[1]
    v = basis[:, :filled]
    c1 = v.to(f64).T @ block.to(f64)
    if filled:
        block.addmm_(v, c1.to(dtype), alpha=-1.0)
    coeffs_first.copy_(c1)
    w1 = block.to(f64)
    gram1 = w1.T @ w1
    # ||w_i||^2 = ||V^T w_i||^2 + ||w_i - V V^T w_i||^2 for orthonormal V: no extra pass.
    norms_sq = (c1.square().sum(0) + gram1.diagonal()).clamp_min(0)
    total = norms_sq if prior_norms_sq is None else norms_sq + prior_norms_sq
    reference = total.sqrt()
    # Every entry of W reaches C1 or G1's diagonal, so a NaN or inf shows in the reference.
    non_finite = ~torch.isfinite(reference).all()
    factor1, diagonal1, info1 = _cholesky(gram1)
    ratio = diagonal1 / reference
    # `not (R_ii > tau * ref_i)` is also true for NaN and for an exactly zero column.
    deficient = (info1 != 0) | (~(diagonal1 > tau * reference)).any()
    eye = torch.eye(b, dtype=f64, device=device)
    inverse1 = torch.linalg.solve_triangular(factor1, eye, upper=True)
    work.copy_(block @ inverse1.to(dtype))
    project_twice = filled > 0
    if project_twice and auto_second_projection:
        kept = diagonal1 / norms_sq.sqrt()
        project_twice = not bool((kept > DGKS_ETA).all())
    c = c1
    if project_twice:
        c2 = v.to(f64).T @ work.to(f64)
        work.addmm_(v, c2.to(dtype), alpha=-1.0)
        c = c1 + c2 @ factor1
    w2 = work.to(f64)
    factor2, _, info2 = _cholesky(w2.T @ w2)
    deficient = deficient | (info2 != 0)
    inverse2 = torch.linalg.solve_triangular(factor2, eye, upper=True)
    q.copy_(torch.where(deficient, block, work @ inverse2.to(dtype)))
    coeffs.copy_(torch.where(deficient, c1, c))
    coupling.copy_(torch.where(deficient, torch.zeros_like(eye), factor2 @ factor1))
    projections = 0 if filled == 0 else (2 if project_twice else 1)
    flags = torch.stack(
        (
            deficient.to(torch.int32),
            non_finite.to(torch.int32),
            info1.to(torch.int32),
            info2.to(torch.int32),
            torch.tensor(projections, dtype=torch.int32, device=device),
        )
    )
    return flags, torch.stack((reference, ratio))
