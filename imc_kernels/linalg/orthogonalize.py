"""Tall-skinny orthogonalization for block Krylov methods (``notes/kernel_design.md`` 3.3).

Blocks ``W`` are ``(n, b)`` with ``n`` large and ``b`` small, stored in the working dtype
(float32 by default). Every inner product that decides anything, the projections ``V^T W``
and the Gram matrices ``W^T W``, is accumulated in float64 by
:func:`imc_kernels.ops.tsmm_xty`; the ``b x b`` factorizations run in float64; only the
application of the small factors to the tall blocks runs in the working dtype.

The pieces:

* :func:`block_cgs2`: two classical Gram-Schmidt passes against a basis ``V``.
* :func:`cholqr` / :func:`cholqr2`: Cholesky QR with an fp64 Gram and a rank check that
  never synchronizes with the host (the check is returned as a device tensor).
* :func:`block_orthonormalize`: the two-pass block Gram-Schmidt the Lanczos expansion uses,
  BCGS2 with a Cholesky QR inside each pass; one call of the ``block_orth_step`` op
  (:func:`imc_kernels.ops.block_orth_step`: the C++/CUDA kernels, or their pure-PyTorch twin)
  whenever the tensors' layout allows, else the same math from the pieces above.
* :func:`svqb`: the rank-revealing fallback (torch.lobpcg's ``_get_svqb``, or an fp64 SVD).
* :func:`random_orthonormal_block`: seeded random directions orthonormal to a basis, to
  replace the directions lost on rank deficiency.

Why BCGS2 (project, CholQR, project, CholQR) rather than CGS2 followed by CholQR2: CGS2 leaves
``W`` orthogonal to ``V`` to ``O(u ||W||)``, and the later ``W R^{-1}`` multiplies that error
by ``kappa(W)``. Measured on CPU (fp32, n = 4000, m = 60, b = 4, fp64 Grams), with ``W``'s
own columns nearly dependent: ``||V^T Q||`` is 5e-7 / 6e-5 / 6e-4 for ``kappa(W)`` = 1e2 /
1e4 / 1e5 with CGS2 + CholQR2, and 1e-8 at every ``kappa`` when the second projection acts on
the already normalized block (Barlow and Smoktunowicz, "Reorthogonalized block classical
Gram-Schmidt", Numer. Math. 2013). The cost is the same: four reads of ``V``, two small Grams.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from imc_kernels import ops
from imc_kernels.reference import block_orth as _block_orth

# tsmm_xty takes at most this many columns per operand; wider operands are split.
_TSMM_MAX_COLUMNS = 512
# On CPU, x^T y with both operands at most this many columns wide is upcast to float64 and
# multiplied by LAPACK rather than by the op (see xty).
_UPCAST_MAX_COLUMNS = 3


class RankInfo(NamedTuple):
    """The rank check of a Cholesky QR, kept on the device (reading it synchronizes).

    Attributes:
        deficient: ``()`` bool: the Cholesky failed, or some ``R_ii`` is at most
            ``tau * reference_i``; the returned ``Q`` must not be used as a basis then.
        ratio: ``(b,)`` float64, ``R_ii / reference_i``: how much of column ``i`` is new.
        cholesky_info: ``()`` int32, 0 on success, else the 1-based index of the first
            failed pivot (LAPACK's ``info``).
        reference: ``(b,)`` float64, the norms the diagonal was compared with (non-finite
            exactly when the block held NaN or inf).
        non_finite: ``()`` bool, the block held NaN or inf (set by
            :func:`block_orthonormalize` only).
        projections: ``()`` int32, projections against the basis (0, 1 or 2; set by
            :func:`block_orthonormalize` only).
    """

    deficient: torch.Tensor
    ratio: torch.Tensor
    cholesky_info: torch.Tensor
    reference: torch.Tensor
    non_finite: torch.Tensor | None = None
    projections: torch.Tensor | None = None


def default_rank_tol(dtype: torch.dtype) -> float:
    """Relative size below which a direction counts as lost: ``100 * eps(dtype)``.

    A block that lies numerically in ``span(V)`` keeps, after two projections, rounding noise
    of relative size ``u`` to ``u * sqrt(m)`` (``u = eps / 2``); ``100 * eps`` sits above that
    floor for bases of up to ~10^4 columns, and a direction kept at that size is still
    orthogonalized to ``O(u)`` by the second pass ("twice is enough" holds while the kept
    part is well above ``u``). In float32 this is 1.2e-5: a Krylov direction that small
    carries couplings far below the default ``tol = 1e-4``, so replacing it costs nothing.
    """
    return 100.0 * torch.finfo(dtype).eps


def _row_major_parent(x: torch.Tensor) -> torch.Tensor | None:
    """The full-width rows of a leading-column view of a row-major buffer, if cheaper to read.

    The Lanczos basis lives in one row-major ``(n, M)`` buffer and the solver projects against
    its first ``m`` columns, a view with row stride ``M``. The op needs contiguous operands,
    so it would first copy the view (read ``m`` columns, write them, read them again: about
    ``3 m`` columns of traffic; measured 83 of 145 ms on CPU for ``n`` = 266,610, ``m`` = 33).
    Reading the whole rows instead costs ``M`` columns and needs no copy (taken while
    ``M <= 3 m + 32``); the extra output rows
    are dropped, and each output row depends only on its own column of ``x``, so whatever the
    unused columns hold (finite or not) cannot reach the kept rows.
    """
    n, m = x.shape
    if n < 2 or x.stride(1) != 1 or x.stride(0) <= m:
        return None
    width = x.stride(0)
    # A strided copy touches the same cache lines as the whole rows when they are short
    # (32 floats are two 64-byte lines), hence the additive slack.
    if width > 3 * m + 32:
        return None
    storage_elements = x.untyped_storage().nbytes() // x.element_size()
    if x.storage_offset() + n * width > storage_elements:
        return None
    return x.as_strided((n, width), (width, 1))


# Rows per chunk of the column-major path: the upcast copy of an (m, 16384) chunk (2.6 MB
# for m = 20) is read again at once by the GEMM, and the chunk count (17 at n = 266,610)
# keeps the per-op overhead small (measured, one thread, b = 1: 3.2 / 4.7 ms for m = 20 / 32
# with 8192-row chunks, 2.8 / 4.9 ms with 32768, 4.8 / 6.7 ms with 2048).
_COLUMN_MAJOR_CHUNK = 16384


def _xty_column_major(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x.T @ y`` for a column-major ``x`` (each column contiguous), float64 accumulation.

    The single-vector Lanczos basis on CPU is stored this way (``(m, n)`` rows), where the op
    would need a transposing copy of the whole operand. Chunks of rows are upcast to float64
    and multiplied by LAPACK, the chunk results summed in float64 in a fixed order: the
    arithmetic of the op's reference twin, deterministic, reading ``x`` once.
    """
    n, m = x.shape
    out = torch.zeros(m, y.shape[1], dtype=torch.float64, device=x.device)
    rows = x.T  # (m, n), contiguous rows
    for start in range(0, n, _COLUMN_MAJOR_CHUNK):
        stop = min(n, start + _COLUMN_MAJOR_CHUNK)
        out.addmm_(rows[:, start:stop].to(torch.float64), y[start:stop].to(torch.float64))
    return out


def xty(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x.T @ y`` accumulated in float64 through :func:`imc_kernels.ops.tsmm_xty`.

    Splits operands wider than the op's 512-column limit and accepts empty operands. On the
    CPU the op reads column slices of a row-major buffer in place and dots a column-major
    ``x`` (the transposed single-vector basis) with one column in place; a column-major ``x``
    against several columns goes through :func:`_xty_column_major`, and operands of at most
    three columns a side are upcast (see below). On a GPU a view of the leading columns of a
    row-major buffer is read through its full rows rather than copied
    (:func:`_row_major_parent`).

    Args:
        x: ``(n, m)``.
        y: ``(n, b)``, same dtype and device.

    Returns:
        ``(m, b)`` float64 on the inputs' device.
    """
    m, b = x.shape[1], y.shape[1]
    if m == 0 or b == 0 or x.shape[0] == 0:
        return torch.zeros(m, b, dtype=torch.float64, device=x.device)
    if (
        x.device.type == "cpu"
        and b == 1
        and x.stride(0) == 1
        and y.stride(0) == 1
        and (m == 1 or x.stride(1) >= x.shape[0])
    ):
        # One column against contiguous columns (the local pass of single-vector Lanczos, its
        # projections against the transposed basis): the op dots them in place. Measured
        # inside a solve (n = 266,610, one thread): 1 x 1 through the upcasts below took
        # 1.6-1.8 ms, their fresh float64 vectors page-faulting; m = 20 0.7 against 1.9 ms for
        # the chunked upcast of _xty_column_major.
        return ops.tsmm_xty(x, y)
    if m == 1 and b == 1 and x.device.type == "cpu" and _same_view(x, y):
        # ||x||^2 of one strided column: the norm reduction casts to float64 as it reads
        # (fp64 products and sums, as below) without the two upcast copies (0.08 against
        # 1.07 ms at n = 266,610, one thread). Contiguous columns took the op above: inside a
        # solve the norm's float64 temporary page-faulted (0.86 against 0.04 ms).
        return torch.linalg.vector_norm(x, dtype=torch.float64).square().view(1, 1)
    if x.device.type == "cpu" and max(m, b) <= _UPCAST_MAX_COLUMNS:
        # Below four columns a side the op's kernels have a fixed cost of ~0.6 ms (one
        # column) to ~1.8 ms (2-3 columns each) at n = 266,610 on one core, and the upcast
        # copies cost less (1 x 1 0.35, 2 x 1 0.40, 2 x 2 0.8-1.0, 3 x 3 1.1 ms; from 4 x 2
        # on the op wins: 0.57 against 1.4 ms). Same arithmetic: fp32 values, fp64 products
        # and sums (the op's reference).
        return x.to(torch.float64).T @ y.to(torch.float64)
    if x.device.type == "cpu" and x.stride(0) == 1 and x.stride(1) >= x.shape[0] and m > 1:
        return _xty_column_major(x, y)
    if x.device.type == "cpu" and m <= _TSMM_MAX_COLUMNS and b <= _TSMM_MAX_COLUMNS:
        # The CPU op reads column slices of a row-major buffer in place (through the row
        # stride) and picks the operand order itself.
        return ops.tsmm_xty(x, y)
    wide = _row_major_parent(x)
    source = x if wide is None else wide
    if source.shape[1] <= _TSMM_MAX_COLUMNS and b <= _TSMM_MAX_COLUMNS:
        if b <= 4 and b < m:
            # (y^T x)^T, a narrow y first: measured for the CPU micro-kernel, which pads its
            # second operand to 8 columns (1 thread, n = 266,610: 32 x 1 7.3 against 8.5 ms),
            # when the CPU took this path; kept on the GPU, not measured there.
            return ops.tsmm_xty(y, source)[:, :m].T.contiguous()
        return ops.tsmm_xty(source, y)[:m]
    rows = []
    for i in range(0, m, _TSMM_MAX_COLUMNS):
        xi = x[:, i : i + _TSMM_MAX_COLUMNS]
        cols = [
            ops.tsmm_xty(xi, y[:, j : j + _TSMM_MAX_COLUMNS])
            for j in range(0, b, _TSMM_MAX_COLUMNS)
        ]
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)


def _same_view(x: torch.Tensor, y: torch.Tensor) -> bool:
    """True when ``x`` and ``y`` are the same elements (the same view of one storage)."""
    return (
        x.data_ptr() == y.data_ptr()
        and x.shape == y.shape
        and x.stride() == y.stride()
        and x.dtype == y.dtype
    )


def project_out(basis: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """One classical Gram-Schmidt pass, in place: ``block -= basis @ (basis^T block)``.

    Args:
        basis: ``(n, m)`` with orthonormal columns (``m`` may be 0).
        block: ``(n, b)``, overwritten.

    Returns:
        The ``(m, b)`` float64 projection coefficients ``basis^T block`` (before the update).
    """
    coeffs = xty(basis, block)
    if basis.shape[1] > 0:
        block.addmm_(basis, coeffs.to(block.dtype), alpha=-1.0)
    return coeffs


def block_cgs2(basis: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classical Gram-Schmidt passes of ``block`` against ``basis`` ("twice is enough").

    Afterwards ``block_in = basis @ C + block_out`` with ``block_out`` orthogonal to
    ``basis`` to working precision, unless ``block_in`` lay numerically inside its span.

    Args:
        basis: ``(n, m)`` with orthonormal columns.
        block: ``(n, b)``; overwritten with the orthogonalized block.

    Returns:
        ``(C, block)``: the ``(m, b)`` float64 coefficients of both passes summed, and the
        orthogonalized block (the same tensor as the input).

    Example:
        >>> V = torch.linalg.qr(torch.randn(100, 5))[0]
        >>> C, W = block_cgs2(V, torch.randn(100, 2))
        >>> bool(xty(V, W).abs().max() < 1e-6)
        True
    """
    coeffs = project_out(basis, block)
    coeffs += project_out(basis, block)
    return coeffs, block


def _cholesky_factor(
    gram: torch.Tensor, reference: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor, RankInfo]:
    """``R = chol(gram)`` (upper), ``R^{-1}`` and the rank check, all fp64, no host sync."""
    b = gram.shape[0]
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)
    diag = factor.diagonal()
    ratio = diag / reference
    # `not (R_ii > tau * ref_i)` is also true for NaN and for an exactly zero column.
    deficient = (info != 0) | (~(diag > tau * reference)).any()
    eye = torch.eye(b, dtype=gram.dtype, device=gram.device)
    # R^{-1} as a b x b matrix in fp64, then one GEMM ``W @ R^{-1}`` in the working dtype:
    # the tall product is one memory-bound pass (a TRSM on n x b is slower on GPUs and has
    # the same O(u * kappa(W)) forward error); casting R^{-1} to fp32 adds an O(u) relative
    # error per entry, removed by the second pass like the rest of the first pass's error.
    factor_inv = torch.linalg.solve_triangular(factor, eye, upper=True)
    return factor, factor_inv, RankInfo(deficient, ratio, info, reference)


def cholqr(
    block: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    tau: float | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, RankInfo]:
    """One Cholesky QR pass with an fp64 Gram: ``block = Q R``.

    Args:
        block: ``(n, b)``, ``n >= b``; not modified.
        reference: ``(b,)`` float64 norms the diagonal of ``R`` is compared with; defaults to
            the column norms of ``block`` (dependence among its own columns).
        tau: rank tolerance, default :func:`default_rank_tol` of the block's dtype.
        out: optional ``(n, b)`` destination for ``Q`` (must not alias ``block``).

    Returns:
        ``(Q, R, rank_info)``; ``R`` is ``(b, b)`` upper triangular float64. When
        ``rank_info.deficient`` is set, ``Q`` is not orthonormal (it may hold NaN).
    """
    tau = default_rank_tol(block.dtype) if tau is None else tau
    gram = xty(block, block)
    if reference is None:
        reference = gram.diagonal().clamp_min(0).sqrt()
    factor, factor_inv, info = _cholesky_factor(gram, reference, tau)
    q = torch.matmul(block, factor_inv.to(block.dtype), out=out)
    return q, factor, info


def cholqr2(
    block: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    tau: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, RankInfo]:
    """CholeskyQR2 (Fukaya et al. 2014) with fp64 Grams: ``block = Q R``, ``Q^T Q = I``.

    The first pass brings ``kappa`` down to ``1 + O(u kappa)``, the second makes ``Q``
    orthonormal to ``O(u)``. With the Gram in float64 the first Cholesky succeeds up to
    ``kappa(block) ~ 1e8`` (notes 3.3: ``||Q^T Q - I||_F`` 2e-7 to 4e-7 for kappa 1e2 to 1e8,
    fp32 data); below ``tau`` (relative, see :func:`default_rank_tol`) the block is
    reported rank deficient instead, and :func:`svqb` should take over.

    Args:
        block: ``(n, b)`` float32 or float64, ``n >= b``; not modified.
        reference: ``(b,)`` float64 reference norms for the rank check (default: the column
            norms of ``block``).
        tau: rank tolerance, default :func:`default_rank_tol`.

    Returns:
        ``(Q, R, rank_info)`` with ``R = R2 @ R1`` upper triangular float64 and
        ``rank_info`` from the first pass (the decisive one), its ``deficient`` flag also
        set if the second Cholesky failed. Nothing here synchronizes with the host.

    Example:
        >>> W = torch.randn(1000, 8)
        >>> Q, R, info = cholqr2(W)
        >>> bool(info.deficient), bool(torch.allclose(Q @ R.float(), W, atol=1e-4))
        (False, True)
    """
    q1, r1, info1 = cholqr(block, reference=reference, tau=tau)
    q, r2, info2 = cholqr(q1, tau=0.0)
    deficient = info1.deficient | (info2.cholesky_info != 0)
    return q, r2 @ r1, info1._replace(deficient=deficient)


# DGKS threshold (Daniel, Gragg, Kaufman and Stewart 1976): a second projection is needed
# only when the first removed more than 1 - eta of a column's norm, i.e. when cancellation
# may have left components along the basis above rounding level. 1/sqrt(2) is their value
# (also ARPACK's and SLEPc's).
DGKS_ETA = 0.7071067811865476
SECOND_PROJECTION = ("always", "auto")


def _fits_op(
    basis: torch.Tensor,
    block: torch.Tensor,
    out: torch.Tensor | None,
    work: torch.Tensor | None,
    prior_norms_sq: torch.Tensor | None,
) -> bool:
    """Whether :func:`imc_kernels.ops.block_orth_step` takes these tensors as they are.

    It reads and writes rows in place (unit column stride), so the column-major basis of the
    single-vector CPU solver and blocks of other layouts take the composed path instead.
    """
    if block.dim() != 2 or basis.dim() != 2 or block.shape[0] < 1:
        return False
    if not 1 <= block.shape[1] <= _block_orth.MAX_BLOCK or basis.shape[0] != block.shape[0]:
        return False
    if block.dtype not in (torch.float32, torch.float64):
        return False
    tall = [t for t in (basis, block, out, work) if t is not None]
    if any(t.dtype != block.dtype or t.device != block.device for t in tall):
        return False
    if prior_norms_sq is not None and (
        prior_norms_sq.dtype != torch.float64 or prior_norms_sq.device != block.device
    ):
        return False
    return all(_block_orth.rows_addressable(t) for t in tall)


def block_orthonormalize(
    basis: torch.Tensor,
    block: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    tau: float | None = None,
    out: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
    prior_norms_sq: torch.Tensor | None = None,
    second_projection: str = "always",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, RankInfo]:
    """Orthonormalize ``block`` against ``basis`` and itself: BCGS2 with Cholesky QR.

    Pass 1: ``W1 = W - V C1``, ``W1 = Q1 R1``; pass 2: ``Q1 = V C2 + W2``, ``W2 = Q R2``.
    Hence ``W = V (C1 + C2 R1) + Q (R2 R1)``. Nothing synchronizes with the host unless
    ``second_projection="auto"``.

    One call of :func:`imc_kernels.ops.block_orth_step` (the C++/CUDA op, or its twin
    :mod:`imc_kernels.reference.block_orth`) when the layouts allow (rows addressable in
    place, see :func:`_fits_op`) and ``reference`` is not given; otherwise the same steps
    composed from :func:`project_out` and :func:`cholqr`'s pieces. Both satisfy the contract
    below; they differ by rounding (the op's ``b x b`` Cholesky is its own loop).

    Args:
        basis: ``(n, m)`` orthonormal columns (``m`` may be 0).
        block: ``(n, b)``; overwritten with ``W1`` (the block after the first projection),
            which the caller can use to repair a deficient block.
        reference: ``(b,)`` float64 norms the rank check compares against; default: the
            norms of the columns of ``block`` before the projection, enlarged by
            ``prior_norms_sq``.
        tau: rank tolerance, default :func:`default_rank_tol`.
        out: optional ``(n, b)`` destination for ``Q`` (may be a column slice of the basis
            buffer past ``basis``'s columns).
        work: optional ``(n, b)`` scratch for ``Q1``.
        prior_norms_sq: ``(b,)`` float64 squared norms of parts the caller already projected
            out of ``block`` (along columns orthonormal to what is left), so the default
            reference is the norm of the block as it was before that.
        second_projection: ``"always"`` (BCGS2) or ``"auto"``: project a second time only
            when some column kept less than :data:`DGKS_ETA` of its norm in the first
            projection, or when the block's own columns are nearly dependent (the first
            Cholesky factor's diagonal, relative to the column norms, below the same
            threshold). ``"auto"`` reads that test on the host (one synchronization); pass
            2's Cholesky QR of the block itself always runs.

    Returns:
        ``(C, Q, B, C1, rank_info)``: ``C = C1 + C2 R1`` ``(m, b)`` and ``B = R2 R1``
        ``(b, b)`` float64, with ``block_in = basis C + Q B``; ``C1`` alone (the coefficients
        matching ``W1``); and the rank check of pass 1, with ``non_finite`` and
        ``projections`` set. On a deficient step ``Q`` is ``W1``, ``C`` is ``C1`` and ``B`` is
        zero (``block_in = basis C + W1``): the raw residual for a repair.
    """
    if second_projection not in SECOND_PROJECTION:
        raise ValueError(
            f"second_projection must be one of {SECOND_PROJECTION}, got {second_projection!r}"
        )
    tau = default_rank_tol(block.dtype) if tau is None else tau
    if reference is None and _fits_op(basis, block, out, work, prior_norms_sq):
        (n, b), m, device = block.shape, basis.shape[1], block.device
        q = torch.empty(n, b, dtype=block.dtype, device=device) if out is None else out
        if work is None:
            work = torch.empty(n, b, dtype=block.dtype, device=device)
        coeffs = torch.empty(m, b, dtype=torch.float64, device=device)
        coeffs_first = torch.empty(m, b, dtype=torch.float64, device=device)
        coupling = torch.empty(b, b, dtype=torch.float64, device=device)
        flags, norms = ops.block_orth_step(
            basis,
            m,
            block,
            work,
            q,
            coeffs,
            coeffs_first,
            coupling,
            tau=tau,
            prior_norms_sq=prior_norms_sq,
            auto_second_projection=second_projection == "auto",
        )
        info = RankInfo(
            deficient=flags[_block_orth.FLAG_DEFICIENT] != 0,
            ratio=norms[1],
            cholesky_info=flags[_block_orth.FLAG_INFO_FIRST],
            reference=norms[0],
            non_finite=flags[_block_orth.FLAG_NON_FINITE] != 0,
            projections=flags[_block_orth.FLAG_PROJECTIONS],
        )
        return coeffs, q, coupling, coeffs_first, info
    return _block_orthonormalize_composed(
        basis, block, reference, tau, out, work, prior_norms_sq, second_projection
    )


def _block_orthonormalize_composed(
    basis, block, reference, tau, out, work, prior_norms_sq, second_projection
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, RankInfo]:
    """:func:`block_orthonormalize` from :func:`project_out`, :func:`xty` and Cholesky pieces."""
    c1 = project_out(basis, block)
    gram1 = xty(block, block)
    # ||w_i||^2 = ||V^T w_i||^2 + ||w_i - V V^T w_i||^2 for orthonormal V: no extra pass.
    norms_sq = (c1.square().sum(0) + gram1.diagonal()).clamp_min(0)
    if reference is None:
        total = norms_sq if prior_norms_sq is None else norms_sq + prior_norms_sq
        reference = total.sqrt()
    r1, r1_inv, info = _cholesky_factor(gram1, reference, tau)
    q1 = torch.matmul(block, r1_inv.to(block.dtype), out=work)
    m = basis.shape[1]
    project = m > 0
    if second_projection == "auto" and project:
        # R1_ii <= ||w1_i|| <= ||w_i||: one ratio covers both cancellation in the projection
        # and dependence among the block's own columns.
        kept = r1.diagonal() / norms_sq.sqrt()
        project = not bool((kept > DGKS_ETA).all())
    coeffs = c1
    if project:
        coeffs = c1 + project_out(basis, q1) @ r1
    r2, r2_inv, info2 = _cholesky_factor(xty(q1, q1), torch.ones_like(reference), 0.0)
    q = torch.matmul(q1, r2_inv.to(block.dtype), out=out)
    deficient = info.deficient | (info2.cholesky_info != 0)
    # The op's contract on a deficient step: the raw residual W1, its C1, no coupling.
    torch.where(deficient, block, q, out=q)
    coeffs = torch.where(deficient, c1, coeffs)
    coupling = torch.where(deficient, torch.zeros_like(r1), r2 @ r1)
    non_finite = ~(torch.isfinite(c1).all() & torch.isfinite(reference).all())
    projections = torch.tensor(
        0 if m == 0 else (2 if project else 1), dtype=torch.int32, device=block.device
    )
    info = info._replace(deficient=deficient, non_finite=non_finite, projections=projections)
    return coeffs, q, coupling, c1, info


def svqb(
    block: torch.Tensor,
    tau: float | None = None,
    *,
    drop: bool = True,
    method: str = "gram",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-revealing orthonormalization: ``block ~= Q B`` with the weak directions dropped.

    ``method="gram"`` is the SVQB of Stathopoulos and Wu (torch.lobpcg's ``_get_svqb``): with
    ``D`` the column norms, ``D^{-1} W^T W D^{-1} = Z E Z^T`` and ``Q = W D^{-1} Z E^{-1/2}``.
    Scaling by the diagonal first makes the test insensitive to column scaling. Going through
    the Gram squares the condition number, so even in float64 it cannot resolve relative
    singular values below ``sqrt(eps_64) ~ 1.5e-8``: the threshold is at least
    ``10 * sqrt(eps_64)``. That is far below the float32 rank tolerance (1.2e-5), not below
    the float64 one (2.2e-14).

    ``method="svd"`` takes the thin SVD of the block in float64 instead (LAPACK, ``O(n b^2)``):
    singular values accurate to ``eps_64 * s_max``, so any ``tau`` is honoured. The Lanczos
    rank repair uses it; it is rare, so the upcast copy does not matter.

    Directions whose singular value, relative to the largest (after diagonal scaling for
    ``"gram"``), is at most ``tau`` are dropped (``drop=True``) or clamped to it. Zero
    columns are always dropped. Synchronizes with the host (data-dependent rank).

    Args:
        block: ``(n, b)``; not modified.
        tau: relative singular-value tolerance, default :func:`default_rank_tol`.
        drop: drop weak directions (``Q`` has ``r <= b`` columns) rather than clamp them.
        method: ``"gram"`` or ``"svd"``.

    Returns:
        ``(Q, B)``: ``Q`` ``(n, r)`` orthonormal to ``O(u / smallest kept singular value)`` for
        ``"gram"`` (follow with a projection pass or CholQR for full accuracy), ``O(u)`` for
        ``"svd"``; ``B`` ``(r, b)`` float64 with ``block ~= Q @ B`` up to the dropped part.

    Example:
        >>> W = torch.randn(100, 3, dtype=torch.float64)
        >>> Q, B = svqb(torch.cat([W, W[:, :1]], dim=1))
        >>> Q.shape, B.shape
        (torch.Size([100, 3]), torch.Size([3, 4]))
    """
    tau = default_rank_tol(block.dtype) if tau is None else tau
    if method == "svd":
        u, sing, vh = torch.linalg.svd(block.to(torch.float64), full_matrices=False)
        floor = tau * sing[0] if sing.numel() else sing.new_zeros(())
        if drop:
            keep = (sing > floor) & (sing > 0)
            u, sing, vh = u[:, keep], sing[keep], vh[keep]
        else:
            sing = torch.maximum(sing, floor.clamp_min(torch.finfo(torch.float64).tiny))
        return u.to(block.dtype), sing[:, None] * vh
    if method != "gram":
        raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
    gram = xty(block, block)
    norms = gram.diagonal().clamp_min(0).sqrt()
    inv_norms = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    scaled = inv_norms[:, None] * gram * inv_norms[None, :]
    evals, evecs = torch.linalg.eigh(scaled)
    evals, evecs = evals.flip(0), evecs.flip(1)  # largest first
    resolution = 100.0 * torch.finfo(torch.float64).eps
    floor = max(tau**2, resolution) * evals[0].clamp_min(0)
    if drop:
        keep = evals > floor
        evals, evecs = evals[keep], evecs[:, keep]
    else:
        evals = torch.maximum(evals, floor.clamp_min(torch.finfo(torch.float64).tiny))
    root = evals.sqrt()
    apply = inv_norms[:, None] * evecs / root[None, :]
    q = block @ apply.to(block.dtype)
    coupling = root[:, None] * evecs.T * norms[None, :]
    return q, coupling


def random_orthonormal_block(
    basis: torch.Tensor,
    count: int,
    generator: torch.Generator,
    *,
    tries: int = 3,
) -> torch.Tensor:
    """``count`` seeded random directions orthonormal to ``basis`` and to each other.

    Drawn on the CPU from ``generator`` (so the stream, and the result, are reproducible for
    a given seed and device), moved to ``basis``'s device and orthonormalized with
    :func:`block_orthonormalize`. Synchronizes with the host (checks the rank).

    Args:
        basis: ``(n, m)`` orthonormal, ``m + count <= n``.
        count: number of directions.
        generator: a CPU ``torch.Generator``.
        tries: redraws allowed if the random block comes out rank deficient.

    Returns:
        ``(n, count)`` in ``basis``'s dtype and device.

    Raises:
        ValueError: ``m + count > n``.
        RuntimeError: no full-rank block after ``tries`` draws.
    """
    n, m = basis.shape
    if m + count > n:
        raise ValueError(f"cannot draw {count} directions orthogonal to {m} in dimension {n}")
    for _ in range(tries):
        draw = torch.randn(n, count, generator=generator, dtype=basis.dtype)
        draw = draw.to(basis.device)
        _, q, _, _, info = block_orthonormalize(basis, draw)
        if not bool(info.deficient):
            return q
    raise RuntimeError(f"could not draw {count} random directions orthogonal to the basis")
