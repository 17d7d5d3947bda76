"""Thick-restart block Lanczos (block Krylov-Schur) for a few eigenpairs of a symmetric operator.

The algorithm of ``notes/kernel_design.md`` 3.2, in pure PyTorch on top of the dispatched
ops, so it runs on any device the operator runs on:

* a float32 (by default) basis ``V``, ``(n, m_max + b)``, and beside it the products ``H V``
  (so the final residuals cost no matvec);
* each block step (:func:`expand_block`): one block product ``W = H Q_j``, full
  reorthogonalization against the whole basis with every projection and Gram in float64
  (:func:`imc_kernels.linalg.orthogonalize.xty`), Cholesky QR of the remainder with a rank
  check;
* the projected matrix ``T`` dense in float64, filled with the *measured* projections
  ``V^T H Q_j`` and the couplings ``B_j`` and symmetrized, so it stays right after restarts
  and rank repairs; ``eigh`` in float64 at every convergence check;
* convergence on the Ritz residual bound ``||B_last S_last,i|| <= tol * ||H||_est`` with
  ``||H||_est`` the largest ``|theta|`` seen, checked every ``check_every`` blocks (default:
  every block on the CPU, so a solve stops as soon as the wanted pairs converge rather than
  when the basis is full; once per restart cycle on a GPU, one host synchronization per cycle;
  the check is an ``eigh`` of at most ``m_max`` rows on the host);
  converged pairs locked in order at restarts;
* thick restart keeping the wanted Ritz vectors plus extras (about half the basis), the kept
  vectors re-orthonormalized when their Gram drifts past 2 eps;
* when everything wanted has converged but a cluster of ``>= max(b, 2)`` equal values sits
  inside the wanted list, one more cycle from a random block looks for copies of a multiple
  eigenvalue that a ``b``-wide Krylov space cannot contain (see ``_needs_verification``);
* the residuals ``||H v - lambda v|| / ||H||_est`` of the returned vectors, from the stored
  products ``(H V) s`` (or, with ``store_products=False``, one more block product).

Orthogonalization (``orthogonalization=``): ``"two_pass"`` is BCGS2 (project, Cholesky QR,
project, Cholesky QR) with no host synchronization inside a step, the default on GPUs.
``"adaptive"``, the default on CPUs where a synchronization costs nothing: the previous and
the current block are projected out first (they hold nearly all of ``H Q_j``), then one
projection against the whole basis, and a second only when the DGKS test says the first
cancelled too much (Daniel, Gragg, Kaufman and Stewart 1976): half the reads of the basis per
step. On a CPU with ``b = 1`` the basis is stored column-major (one vector per row), so that
column accesses are contiguous, and an adaptive step is one call of the
``lanczos_vector_step`` op (local pass, projection, DGKS test, normalization into the next
row and the copy of the product, in four passes over the vector; MLP k = 10, 21 steps: the
solver outside the products 0.108 -> 0.088 s).

Host synchronization: one per convergence check (the rank and finite flags of the steps are
read with it; by default one per restart cycle on a GPU), plus one per step in ``"adaptive"``
mode (the CPU default). A rank-deficient step (the Krylov
space hit an invariant subspace) is rare; when a check's flags show one, the blocks expanded
after it are discarded, the step is repaired (rank-revealing SVQB through an fp64 SVD, random
replacement of the lost directions) and the solver checks every later step immediately,
since rank loss tends to recur.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imc_kernels import _memory, ops
from imc_kernels.linalg import buffers
from imc_kernels.linalg.orthogonalize import (
    block_cgs2,
    block_orthonormalize,
    cholqr2,
    default_rank_tol,
    project_out,
    random_orthonormal_block,
    svqb,
    xty,
)
from imc_kernels.ops import gemm
from imc_kernels.reference import block_orth as _block_orth

WHICH = ("LA", "LM", "SA")
ORTHOGONALIZATION = ("auto", "two_pass", "adaptive")

# Restart cycles the default budget allows (notes 3.5: max_restarts ~ 50).
DEFAULT_MAX_RESTARTS = 50
# Largest default block: >= the largest expected outlier cluster (about one per class for
# softmax cross-entropy nets with 10 classes) and a multiple of 8 for GEMM tiles.
DEFAULT_MAX_BLOCK = 16


@dataclass
class LanczosResult:
    """Eigenpairs from :func:`block_lanczos`.

    Attributes:
        eigenvalues: ``(k,)`` float64 Ritz values: descending for ``"LA"``, by descending
            ``|lambda|`` for ``"LM"``, ascending for ``"SA"``.
        eigenvectors: ``(dim, k)`` orthonormal columns, the solver dtype and device.
        residuals: ``(k,)`` float64 true residuals ``||H v - lambda v|| / ||H||_est``,
            measured at the end from the operator's stored products ``(H V) s`` (or from
            one more block product with ``store_products=False``).
        ritz_bounds: ``(k,)`` float64 Ritz residual bounds, also divided by ``||H||_est``
            (0 for the direct path, where the subspace is the whole space).
        converged: ``(k,)`` bool: ``ritz_bound <= tol``.
        n_matvecs: operator applications, each column of a block product counted once
            (a final residual product included).
        restarts: thick restarts performed.
        h_norm: ``||H||_est``, the largest ``|theta|`` seen.
        block_size: the block size used.
        basis_size: the basis size ``m_max`` used (``dim`` on the direct path).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    ritz_bounds: torch.Tensor
    converged: torch.Tensor
    n_matvecs: int
    restarts: int
    h_norm: float
    block_size: int
    basis_size: int

    @property
    def all_converged(self) -> bool:
        """True when every returned pair met the tolerance."""
        return bool(self.converged.all())


@dataclass
class LanczosCycle:
    """What a ``callback`` sees at each convergence check (after the Rayleigh-Ritz step).

    Attributes:
        cycle: 0-based restart cycle (several checks per cycle).
        n_matvecs: operator applications so far.
        restarts: thick restarts so far.
        basis_columns: columns in the Rayleigh-Ritz subspace ``m``.
        n_converged: length of the converged prefix among the ``k`` wanted pairs.
        ritz_values: ``(min(k, m),)`` float64 (CPU), in the order of the result.
        ritz_bounds: ``(min(k, m),)`` float64 (CPU), divided by ``h_norm``.
        h_norm: ``||H||_est``.
        basis: ``(n, m + b)`` view of the basis including the pending block; orthonormal.
            Valid during the callback only (the solver overwrites it); a debugging hook.
    """

    cycle: int
    n_matvecs: int
    restarts: int
    basis_columns: int
    n_converged: int
    ritz_values: torch.Tensor
    ritz_bounds: torch.Tensor
    h_norm: float
    basis: torch.Tensor


def _symmetry_rtol(dtype: torch.dtype) -> float:
    """Relative asymmetry above which an operator is rejected.

    An fp32 product (HVP by autograd, an fp32 matrix) is symmetric to ~1e-6 relative; 1e-3
    leaves three orders of margin. For fp64 the same margin gives 1e-6, which still tolerates
    an fp64 solve of an operator computed internally in fp32.
    """
    return 1e-6 if dtype == torch.float64 else 1e-3


def _wanted_order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``theta`` in the order the result lists them (stable on ties)."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.lexsort((-theta, -np.abs(theta)))


# Rows per chunk of the in-place basis rotations at restarts (CPU): the chunk's product
# (8192 x 64 floats, 2 MiB) is written back while it is still in cache.
_ROTATION_CHUNK = 8192


def _chunk_rows(n: int, device: torch.device) -> int:
    """Rows per chunk of the basis-sized products: ``_ROTATION_CHUNK`` on the CPU, all ``n`` on
    a GPU (memory is not the constraint there, launches are)."""
    return n if device.type != "cpu" else _ROTATION_CHUNK


def _column_chunk_products(rows: torch.Tensor, s: torch.Tensor):
    """Yield ``(start, stop, out)`` with ``out = s^T rows[:, start:stop]``, chunk by chunk.

    ``rows`` is ``(m, n)`` with contiguous rows (the transposed store of the products, or a
    column-major basis seen row-wise), ``s`` is ``(m, k)``; ``out`` is a ``(k, stop - start)``
    view of one buffer reused for every chunk, valid until the next one.
    """
    n = rows.shape[1]
    chunk = _chunk_rows(n, rows.device)
    s_t = s.T.contiguous()
    buffer = torch.empty(s.shape[1], min(chunk, n), dtype=rows.dtype, device=rows.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        out = buffer[:, : stop - start]
        gemm(s_t, rows[:, start:stop], out=out)
        yield start, stop, out


def _rotate_in_place(view: torch.Tensor, s: torch.Tensor, *, gram: bool) -> torch.Tensor | None:
    """``view[:, :k] = view @ s`` in place, chunk by chunk; optionally the result's Gram.

    ``view`` is ``(n, m)``, row-major or column-major (a leading-column slice of the basis
    buffer, or the transposed stored products); ``s`` is ``(m, k)`` with ``k <= m``. Each chunk
    of rows is multiplied into a small buffer and written back: the chunk's inputs are read
    before its outputs are written and chunks are disjoint, so no ``(n, k)`` temporary is
    needed. A fresh ``(n, k)`` result costs its page faults (68 MB for the MLP at k = 64: such a
    product took 57 ms in a profile, ~11 ms of it arithmetic), and the transposed products a
    transposing copy on top. With ``gram``,
    the float64 ``Y^T Y`` of ``Y = view @ s`` (summed over chunks in order, deterministic)
    is returned, read from the chunks while they are in cache. On a GPU one chunk (the whole
    view): memory is not the constraint there, launches are.
    """
    n = view.shape[0]
    k = s.shape[1]
    chunk = _chunk_rows(n, view.device)
    total = torch.zeros(k, k, dtype=torch.float64, device=view.device) if gram else None
    if view.stride(0) == 1 and view.stride(1) != 1:  # column-major: contiguous rows of view.T
        rows = view.T
        for start, stop, out in _column_chunk_products(rows, s):
            rows[:k, start:stop] = out
            if total is not None:
                total += xty(out.T, out.T)
    else:
        buffer = torch.empty(min(chunk, n), k, dtype=view.dtype, device=view.device)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            out = buffer[: stop - start]
            gemm(view[start:stop], s, out=out)
            view[start:stop, :k] = out
            if total is not None:
                total += xty(out, out)
    return total


def copy_block(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for two ``(n, b)`` blocks of the same dtype whose rows are contiguous
    (a column slice of the basis and a contiguous block, either way round).

    On the CPU, rows of a multiple of 16 bytes are copied as ``complex128`` elements: a row of
    a float32 block of 4 is then one element, and TensorIterator runs a 1-D strided copy
    instead of a 2-D one with a 4-long inner loop (n = 266,610, one thread, cold caches: into
    the basis slot 1.5 -> 0.8 ms, out of it 2.9 -> 0.9 ms; b = 8 1.4 -> 0.9 ms). Bitwise a
    copy either way; an offset or row stride off a 16-byte boundary takes the plain copy.
    """
    if (
        dst.device.type == "cpu"
        and src.device == dst.device
        and dst.dtype == src.dtype
        and dst.dim() == 2
        and dst.shape == src.shape
        and dst.stride(1) == 1
        and src.stride(1) == 1
        and dst.shape[0] > 1
        and (dst.shape[1] * dst.element_size()) % 16 == 0
    ):
        try:
            wide_dst = dst.view(torch.complex128)
            wide_src = src.view(torch.complex128)
        except RuntimeError:  # not on a 16-byte boundary
            pass
        else:
            wide_dst.copy_(wide_src)
            return
    dst.copy_(src)


def check_seed(seed) -> int:
    """``seed`` as an int for ``torch.Generator.manual_seed``.

    Raises:
        TypeError: not an integer (torch refuses a string, and a float would be truncated).
        ValueError: outside ``[-2**63, 2**64)``, what a generator's seed holds.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must lie in [-2**63, 2**64), got {seed}")
    return seed


class _Operator:
    """Uniform ``(dim, b) -> (dim, b)`` block product over the accepted operator types."""

    def __init__(self, operator: Any, dim: int, dtype, device):
        self.dim = dim
        op_dtype, op_device = None, None
        if isinstance(operator, torch.Tensor):
            if operator.dim() != 2 or tuple(operator.shape) != (dim, dim):
                raise ValueError(
                    f"a matrix operator must be {dim} x {dim}, got shape {tuple(operator.shape)}"
                )
            if not operator.dtype.is_floating_point:
                # Blocks are applied in the matrix's dtype: an integer matrix would truncate
                # every basis vector (to zeros) and a complex one lose its imaginary part.
                raise TypeError(
                    "a matrix operator must have a floating dtype, float32 or float64 (got "
                    f"{operator.dtype}); convert it with .float() or .double()"
                )
            op_dtype, op_device = operator.dtype, operator.device
            if operator.layout == torch.sparse_coo:
                self._apply = lambda block: torch.sparse.mm(operator, block)
            else:
                self._apply = lambda block: operator @ block
        elif hasattr(operator, "matmat"):
            self._apply = operator.matmat
            op_dtype = getattr(operator, "dtype", None)
            op_device = getattr(operator, "device", None)
        elif callable(operator):
            self._apply = operator
        elif hasattr(operator, "__matmul__"):
            self._apply = lambda block: operator @ block
        else:
            raise TypeError(
                "matmat must be a callable on (dim, b) blocks, a dense or sparse tensor, or an "
                f"object with .matmat or @; got {type(operator).__name__}"
            )
        if dtype is None:
            dtype = op_dtype if op_dtype in (torch.float32, torch.float64) else torch.float32
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device if device is not None else (op_device or "cpu"))
        # A matrix in another dtype is applied in its own dtype (an fp64 matrix stays exact).
        self._input_dtype = op_dtype if isinstance(operator, torch.Tensor) else None

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        x = block if self._input_dtype is None else block.to(self._input_dtype)
        product = self._apply(x)
        if not isinstance(product, torch.Tensor):
            raise TypeError(f"the operator returned {type(product).__name__}, not a tensor")
        if product.layout != torch.strided:
            product = product.to_dense()
        if tuple(product.shape) != tuple(block.shape):
            raise ValueError(
                f"the operator mapped a block of shape {tuple(block.shape)} to "
                f"{tuple(product.shape)}; it must return a block of the same shape"
            )
        if product.dtype != self.dtype or product.device != self.device:
            product = product.to(dtype=self.dtype, device=self.device)
        return product


def _project_out_local(block: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """The local pass of one block: ``product -= block (block^T product)``; returns the fp64
    coefficients. The update goes through ``ops.gemm`` (oneDNN for float32 on the CPU:
    n = 266,610, b = 4, one thread, 0.6 against 1.5 ms for ``addmm_``); its rounding is
    removed by the full projection that follows, like the rest of this pass's error."""
    coeffs = xty(block, product)
    gemm(block, coeffs.neg().to(product.dtype), out=product, beta=1.0)
    return coeffs


def expand_block(
    basis: torch.Tensor,
    projected: torch.Tensor,
    start: int,
    product: torch.Tensor,
    *,
    n_locked: int = 0,
    tau: float | None = None,
    work: torch.Tensor | None = None,
    local_start: int | None = None,
    second_projection: str = "always",
    local: torch.Tensor | Sequence[torch.Tensor] | None = None,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One block Lanczos step, written into preallocated storage.

    With ``b = product.shape[1]``, ``Q_j = basis[:, start:start+b]`` and
    ``product = H @ Q_j``: orthonormalizes ``product`` against ``basis[:, :start+b]`` and
    itself (:func:`~imc_kernels.linalg.orthogonalize.block_orthonormalize`: two passes of
    projection + Cholesky QR with fp64 Grams, the interleaved form of CGS2 + CholQR2) so that
    ``H Q_j = V C + Q_{j+1} B_j``, and writes

    * ``Q_{j+1}`` to ``basis[:, start+b : start+2b]``,
    * ``C`` to ``projected[:start+b, start:start+b]`` (rows below ``n_locked`` zeroed: locked
      pairs are deflated, their couplings are residual-sized),
    * ``B_j`` to ``projected[start+b : start+2b, start:start+b]``.

    If the step is rank deficient, the raw residual ``W1 = H Q_j - V C1`` is stored in the
    ``Q_{j+1}`` slot instead, ``C1`` in ``T`` and zeros for ``B_j``, for the caller's repair.
    The orthogonalization is one call of the ``block_orth_step`` op (C++/CUDA, or its
    pure-PyTorch twin) whenever the basis rows are addressable in place.

    With ``local_start``, the columns ``basis[:, local_start:start+b]`` (the previous and the
    current block of a Lanczos recurrence, which hold nearly all of ``H Q_j``) are projected
    out first; the full projections then remove only small components, so with
    ``second_projection="auto"`` the second full pass is usually skipped (DGKS test, one host
    synchronization): half the reads of the basis per step.

    Args:
        basis: ``(n, >= start + 2b)`` basis storage.
        projected: float64 ``T`` storage, at least ``(start + 2b, start + b)``.
        start: first column of ``Q_j``.
        product: ``(n, b)`` ``H @ Q_j``; overwritten.
        n_locked: leading basis columns that are locked.
        tau: rank tolerance (default :func:`default_rank_tol`).
        work: optional ``(n, b)`` scratch.
        local_start: first column of a local pass, or None for none.
        second_projection: ``"always"`` (no host synchronization) or ``"auto"``.
        local: optional contiguous copies of the blocks of ``basis[:, local_start:start+b]``,
            in order (a strided slice of the basis costs a gather); each is projected out in
            turn. The blocks are orthonormal and mutually orthogonal, so this equals one
            projection against all of them up to rounding.
        q_out: optional contiguous ``(n, b)`` buffer that receives ``Q_{j+1}`` (or the raw
            residual) first; it is then copied into the basis slot. A contiguous copy of the
            next block for the next product, at the price of a scatter into the slot rather
            than a gather from it (1.1 against 2.2 ms at n = 266,610, b = 4, one thread).
            It may be one of the ``local`` blocks: it is written after the local pass.

    Returns:
        ``(2,)`` bool device tensor ``[non_finite, deficient]``.
    """
    b = product.shape[1]
    end = start + b
    tau = default_rank_tol(basis.dtype) if tau is None else tau
    slot = basis[:, end : end + b]
    local_coeffs, prior = None, None
    if local_start is not None and local_start < end:
        if local is None:
            local_coeffs = project_out(basis[:, local_start:end], product)
        else:
            pieces = (local,) if isinstance(local, torch.Tensor) else local
            local_coeffs = torch.cat([_project_out_local(piece, product) for piece in pieces])
        prior = local_coeffs.square().sum(0)
    # Q_{j+1} goes straight into its slot; on a deficient step the slot gets the raw residual
    # W1 (and T the coefficients C1, zero coupling), so the repair needs no second product.
    coeffs, _, coupling, _, info = block_orthonormalize(
        basis[:, :end],
        product,
        tau=tau,
        out=slot if q_out is None else q_out,
        work=work,
        prior_norms_sq=prior,
        second_projection=second_projection,
    )
    # A NaN/inf anywhere in the product reaches the first projection or the reference norms
    # (sums of squares over every entry), so the op's flag covers the whole block.
    non_finite = info.non_finite
    if local_coeffs is not None:
        coeffs[local_start:end] += local_coeffs
        non_finite = non_finite | ~torch.isfinite(local_coeffs).all()
    deficient = info.deficient & ~non_finite
    if q_out is not None:
        copy_block(slot, q_out)
    if n_locked:
        coeffs[:n_locked] = 0.0
    projected[:end, start:end] = coeffs
    projected[end : end + b, start:end] = coupling
    return torch.stack((non_finite, deficient))


class _BlockKrylovSchur:
    """State of one solve: the basis, ``T``, locking and counters."""

    def __init__(
        self,
        op: _Operator,
        k,
        which,
        tol,
        b,
        m_max,
        budget,
        generator,
        progress,
        cb,
        *,
        check_every: int = 1,
        store_products: bool = True,
        orthogonalization: str = "two_pass",
    ):
        self.op, self.k, self.which, self.tol = op, k, which, tol
        self.b, self.m_max, self.budget = b, m_max, budget
        self.generator, self.callback = generator, cb
        self.check_every = check_every
        self.adaptive = orthogonalization == "adaptive"
        n, dtype, device = op.dim, op.dtype, op.device
        self.tau = default_rank_tol(dtype)
        # Single vectors on a CPU: a row-major (n, m) buffer makes every column access a
        # strided gather or scatter over n cache lines (2 ms each at n = 266,610) and feeds
        # the projections to a kernel that pads one column to eight. Stored column-major
        # instead ((m, n) rows, one vector per row), columns are contiguous and the
        # projections take orthogonalize._xty_column_major: projection, update and column
        # traffic 4 ms per step instead of 13 ms at m = 20 (one thread).
        self.column_major = device.type == "cpu" and b == 1
        if self.column_major:
            # Uninitialized: a row is written (the start block, a step's slot, a restart's
            # rotation or repair) before anything reads it, and rows past the filled ones are
            # never read, so a solve that converges early never touches them (a zero fill cost
            # ~10 ms of page faults and stores for the MLP at k = 10, 10 of its 31 rows unused).
            # Taken from the buffer cache when a solve of the same size ran before (see
            # imc_kernels.linalg.buffers: no page faults), and handed back by release().
            self._basis_flat = buffers.take((m_max + b) * n, dtype, device)
            self.basis = self._basis_flat.view(m_max + b, n).T
        else:
            # Row-major. On a GPU it grows with the basis: the projections there read whole
            # rows of it (see orthogonalize._row_major_parent), so a buffer much wider than
            # the filled part would be read for nothing at every step. The CPU kernels read
            # the filled columns in place through the row stride, so the buffer has its full
            # width at once: growing it cost a zero fill and a copy at each of four widenings
            # (~0.1 s of a 4 s MLP solve at k = 32). Zeros, not empty: no denormals there.
            full = m_max + b
            width = full if device.type == "cpu" else min(full, max(32, 4 * b))
            self._basis_flat = buffers.take(n * width, dtype, device, zero=True)
            self.basis = self._basis_flat.view(n, width)
        # H V beside V: the final residuals H y - theta y come from the measured products
        # (H V) s, which costs no matvec; without it one more block product of the k vectors.
        # Stored transposed, (m_max, n): one block's products are then b contiguous rows,
        # written without the strided traffic of a column of a row-major buffer.
        self._products_flat = self.products_t = None
        if store_products:
            self._products_flat = buffers.take(m_max * n, dtype, device)
            self.products_t = self._products_flat.view(m_max, n)
        self.reserve = 0 if store_products else k  # matvecs kept back for the final residuals
        self.projected = torch.zeros(m_max + b, m_max + b, dtype=torch.float64, device=device)
        self.flags = torch.zeros(m_max // b + 1, 2, dtype=torch.bool, device=device)
        # The operator's input, a contiguous copy of the current block. With adaptive
        # orthogonalization the previous one is kept too, for the local pass: each step writes
        # Q_{j+1} into block_prev and the two buffers swap roles, so after a step block_in
        # holds the next input and block_prev its predecessor. `local_ready` says both are
        # valid; anything else that writes the basis (restart, repair, rollback) clears it.
        # Single vectors on a CPU with adaptive orthogonalization: each step is one call of the
        # lanczos_vector_step op on the transposed basis (local pass, projection, DGKS test,
        # normalization into the basis row, the product stored on the way), and the next
        # product reads its basis row in place; no input buffers.
        self.vector_steps = self.column_major and self.adaptive
        buffered = not self.vector_steps
        self.block_in = torch.empty(n, b, dtype=dtype, device=device) if buffered else None
        self.block_prev = (
            torch.empty(n, b, dtype=dtype, device=device) if self.adaptive and buffered else None
        )
        self.local_ready = False
        self.work = torch.empty(n, b, dtype=dtype, device=device)
        self.filled = 0  # columns in the Rayleigh-Ritz subspace; pending block follows
        self.n_locked = 0
        self.locked_theta = np.zeros(0)
        self.locked_bound = np.zeros(0)
        self.n_matvecs = 0
        self.restarts = 0
        self.cycle = 0
        self.block_in_cycle = 0
        self.h_norm = 0.0
        self.checked = False  # after a rank repair: read each step's flags at once
        self.symmetry_checked = False
        self.verified_values: np.ndarray | None = None  # wanted values at the last search
        self.pbar = None
        if progress:
            from tqdm.auto import tqdm

            desc = progress if isinstance(progress, str) else "block Lanczos"
            self.pbar = tqdm(total=budget, unit="matvec", desc=desc)

    def release(self) -> None:
        """Hand the basis and the stored products to the buffer cache for the next solve
        (after the result is formed; the state is unusable afterwards). A buffer something
        else still refers to (a view a callback kept) is dropped instead."""
        flats = (self._basis_flat, self._products_flat)
        self.basis = self.products_t = self._basis_flat = self._products_flat = None
        for flat in flats:
            if flat is not None:
                buffers.give(flat)

    # ---- products and steps -------------------------------------------------------------

    def _product(self, block: torch.Tensor) -> torch.Tensor:
        if self.vector_steps:
            product = self.op(block)  # a contiguous basis row
        else:
            if not self.local_ready:  # else the last step left this block in block_in
                copy_block(self.block_in, block)
            product = self.op(self.block_in)
        self.n_matvecs += block.shape[1]
        if self.pbar is not None:
            self.pbar.update(block.shape[1])
        return product

    def _block_step(self, start: int, product: torch.Tensor) -> torch.Tensor:
        """One block step through :func:`expand_block` (stores the product first)."""
        b = self.b
        if self.products_t is not None:
            # Through the transposed destination: TensorIterator's fast path (0.27
            # against 1.2 ms for n = 266,610, b = 4, one thread, as the other way).
            self.products_t[start : start + b].T.copy_(product)
        local, local_start = None, None
        if self.adaptive:
            if self.local_ready:
                local, local_start = (self.block_prev, self.block_in), start - b
            else:
                local, local_start = (self.block_in,), start
        flags = expand_block(
            self.basis,
            self.projected,
            start,
            product,
            n_locked=self.n_locked,
            tau=self.tau,
            work=self.work,
            local_start=local_start,
            second_projection="auto" if self.adaptive else "always",
            local=local,
            q_out=self.block_prev if self.adaptive else None,
        )
        if self.adaptive:
            # block_prev now holds Q_{j+1}: it is the next input, block_in the previous.
            self.block_prev, self.block_in = self.block_in, self.block_prev
            self.local_ready = True
        return flags

    def _vector_step(self, start: int, product: torch.Tensor) -> torch.Tensor:
        """One single-vector step through the ``lanczos_vector_step`` op (CPU, transposed
        basis): the same local pass, projection, DGKS test and rank check as
        :func:`expand_block`, in four passes over the vector. Returns ``[non_finite,
        deficient]`` like :func:`expand_block`."""
        end = start + 1
        w = product[:, 0]
        if w.stride(0) != 1:
            w = w.contiguous()
        elif w.untyped_storage().data_ptr() == self.basis.untyped_storage().data_ptr():
            w = w.clone()  # the operator returned its input, a row of the basis
        stored = None if self.products_t is None else self.products_t[start]
        coeffs, coupling, step_flags, _ = ops.lanczos_vector_step(
            self.basis.T,
            end,
            2 if self.local_ready else 1,
            w,
            tau=self.tau,
            product_out=stored,
        )
        if self.n_locked:
            coeffs[: self.n_locked] = 0.0
        self.projected[:end, start] = coeffs
        self.projected[end, start] = coupling
        self.local_ready = True
        non_finite = step_flags[_block_orth.FLAG_NON_FINITE] != 0
        deficient = (step_flags[_block_orth.FLAG_DEFICIENT] != 0) & ~non_finite
        return torch.stack((non_finite, deficient))

    def _check_first_block(self, block: torch.Tensor, product: torch.Tensor) -> None:
        """``u^T (H v)`` against ``v^T (H u)`` over the first block (one sync, once)."""
        self.symmetry_checked = True
        if block.shape[1] < 2:
            return  # b = 1: checked on T after the first cycle
        inner = xty(block, product)
        scale = torch.linalg.vector_norm(product, dim=0).max().to(torch.float64)
        asym = (inner - inner.T).abs()
        worst = int(asym.argmax())
        i, j = divmod(worst, inner.shape[1])
        if bool(asym[i, j] > _symmetry_rtol(self.op.dtype) * scale):
            raise ValueError(
                "the operator is not symmetric: for two columns u, v of the first block "
                f"u^T(Hv) = {float(inner[i, j]):.6g} but v^T(Hu) = {float(inner[j, i]):.6g} "
                f"(scale ||Hu|| = {float(scale):.3g}); block Lanczos needs a symmetric operator"
            )

    def _raise_non_finite(self, index: int, start: int) -> None:
        raise FloatingPointError(
            f"block Lanczos: the operator returned a non-finite value (NaN or inf) in restart "
            f"cycle {self.cycle}, block {index} (basis columns {start}:{start + self.b}, "
            f"after {self.n_matvecs} matvecs)"
        )

    def _repair(self, start: int) -> bool:
        """Finish a deficient step: drop lost directions, replace them by random ones.

        Returns True when the whole block was lost (an invariant subspace was found).
        """
        b, tau = self.b, self.tau
        self.local_ready = False
        end = start + b
        basis, projected = self.basis[:, :end], self.projected
        residual = self.basis[:, end : end + b].clone()
        coeffs = projected[:end, start:end].clone()
        # Pre-projection column norms ||H q_i|| (the locked rows were zeroed; they are
        # residual-sized, so the reference hardly changes).
        reference = (coeffs.square().sum(0) + xty(residual, residual).diagonal()).sqrt()
        # The residual may be mostly rounding noise; project it again before judging it.
        extra, residual = block_cgs2(basis, residual)
        noise = torch.linalg.vector_norm(residual, dim=0).to(torch.float64) <= tau * reference
        residual[:, noise] = 0.0
        # The SVD variant: the Gram-based SVQB cannot resolve below sqrt(eps_64) (see svqb),
        # and in float64 a direction dropped there would be a coupling lost at 1e-8.
        kept, coupling = svqb(residual, tau, method="svd")
        rank = kept.shape[1]
        new_coupling = torch.zeros(b, b, dtype=torch.float64, device=residual.device)
        if rank:
            # Kept directions may be small remainders; one more BCGS2 pass makes them
            # orthogonal to the basis to working precision.
            more, q, r, _, info = block_orthonormalize(basis, kept)
            if bool(info.deficient):  # pragma: no cover - kept directions are well above noise
                rank = 0
            else:
                extra += more @ coupling
                new_coupling[:rank] = r @ coupling
                self.basis[:, end : end + rank] = q
        if rank < b:
            self.basis[:, end + rank : end + b] = random_orthonormal_block(
                self.basis[:, : end + rank], b - rank, self.generator
            )
        if self.n_locked:
            extra[: self.n_locked] = 0.0
        projected[:end, start:end] += extra
        projected[end : end + b, start:end] = new_coupling
        return rank == 0

    def _discard_after(self, filled: int) -> None:
        """Forget the blocks expanded past ``filled`` (rolled back)."""
        b = self.b
        self.local_ready = False
        self.projected[:, filled:] = 0.0
        self.projected[filled + b :, :] = 0.0

    def _ensure_capacity(self, columns: int) -> None:
        """Widen the basis buffer (by half, at least to ``columns``) when it is too narrow."""
        capacity = self.basis.shape[1]
        if columns <= capacity or self.column_major:
            return
        limit = self.m_max + self.b
        wider = min(limit, max(columns, capacity + capacity // 2))
        grown = torch.zeros(
            self.basis.shape[0], wider, dtype=self.basis.dtype, device=self.basis.device
        )
        used = min(capacity, self.filled + self.b)
        grown[:, :used] = self.basis[:, :used]
        self.basis, self._basis_flat = grown, None  # (a GPU buffer: never cached)

    def can_expand(self) -> bool:
        """Room for one more block in the basis and in the matvec budget."""
        room = self.filled + self.b <= self.m_max
        return room and self.n_matvecs + self.b <= self.budget - self.reserve

    def _fill(self) -> None:
        """Expand up to ``check_every`` blocks (fewer when the basis or the budget ends).

        The steps' rank and finite flags stay on the device and are read once, at the end,
        with the convergence check that follows (one host synchronization per check).
        """
        b = self.b
        while True:
            starts: list[int] = []
            exhausted = False
            while len(starts) < self.check_every and self.can_expand():
                start = self.filled
                self._ensure_capacity(start + 2 * b)
                block = self.basis[:, start : start + b]
                product = self._product(block)
                if not self.symmetry_checked:
                    self._check_first_block(block, product)
                if self.vector_steps:
                    flags = self._vector_step(start, product)
                else:
                    flags = self._block_step(start, product)
                self.filled += b
                index = self.block_in_cycle
                self.block_in_cycle += 1
                if self.checked:
                    non_finite, deficient = flags.tolist()
                    if non_finite:
                        self._raise_non_finite(index, start)
                    if deficient and self._repair(start):
                        exhausted = True
                        break
                    starts.append(-1)  # counted, already checked
                else:
                    self.flags[len(starts)] = flags
                    starts.append(start)
            pending = [start for start in starts if start >= 0]
            if not pending or exhausted:
                return
            host_flags = self.flags[: len(pending)].cpu().tolist()
            first_index = self.block_in_cycle - len(pending)
            for offset, (start, (non_finite, deficient)) in enumerate(
                zip(pending, host_flags, strict=True)
            ):
                if non_finite:
                    self._raise_non_finite(first_index + offset, start)
                if deficient:
                    # Roll back the blocks expanded after the deficient step, repair it and
                    # from now on check each step at once; then fill up to the next check.
                    self.filled = start + b
                    self.block_in_cycle = first_index + offset + 1
                    self._discard_after(self.filled)
                    self.checked = True
                    if self._repair(start):
                        return
                    break
            else:
                return

    # ---- Rayleigh-Ritz, convergence, restart ---------------------------------------------

    def _rayleigh_ritz(self):
        """``eigh`` of ``T`` on the host in float64; returns the quantities of the cycle."""
        m, b, locked = self.filled, self.b, self.n_locked
        t_full = self.projected[: m + b, :m].cpu()
        t = t_full[:m, :m]
        if self.cycle == 0:
            self._check_projected_symmetry(t)
        t = 0.5 * (t + t.T)
        theta_active, s_active = torch.linalg.eigh(t[locked:, locked:])
        coupling = t_full[m:, m - b :]  # B_last
        bounds_active = torch.linalg.vector_norm(coupling @ s_active[-b:, :], dim=0)
        theta = np.concatenate([self.locked_theta, theta_active.numpy()])
        bounds = np.concatenate([self.locked_bound, bounds_active.numpy()])
        self.h_norm = max(self.h_norm, float(np.abs(theta).max(initial=0.0)))
        order = _wanted_order(theta, self.which)
        threshold = self.tol * self.h_norm
        good = bounds[order[: self.k]] <= threshold  # fewer than k entries while m < k
        n_converged = int(np.argmin(good)) if not good.all() else len(good)
        return theta, s_active, bounds, coupling, order, n_converged

    def _check_projected_symmetry(self, t: torch.Tensor) -> None:
        """On the first cycle, ``T``'s measured upper and lower parts must agree (b = 1 too)."""
        scale = float(t.abs().max()) if t.numel() else 0.0
        asym = float((t - t.T).abs().max()) if t.numel() else 0.0
        if scale > 0 and asym > _symmetry_rtol(self.op.dtype) * scale:
            raise ValueError(
                "the operator is not symmetric: the projected matrix V^T H V differs from its "
                f"transpose by {asym:.3g} (scale {scale:.3g}); block Lanczos needs a symmetric "
                "operator"
            )

    def _ritz_vectors(self, s_active: torch.Tensor, columns: np.ndarray) -> torch.Tensor:
        """``V[:, :m] S[:, columns]`` with ``S = blockdiag(I_locked, S_active)``."""
        m, locked = self.filled, self.n_locked
        full = torch.zeros(m, len(columns), dtype=torch.float64)
        for out_col, col in enumerate(columns):
            if col < locked:
                full[col, out_col] = 1.0
            else:
                full[locked:, out_col] = s_active[:, col - locked]
        return full

    def _restart(
        self, theta, s_active, bounds, coupling, order, n_converged, *, verify: bool = False
    ) -> None:
        """Thick restart: keep the wanted Ritz vectors plus extras, lock the converged prefix.

        With ``verify`` (every wanted pair converged) only the ``k`` wanted vectors are kept,
        all locked, and the pending block is replaced by random directions orthogonal to them:
        the next cycle searches the rest of the space for missed copies of a multiple
        eigenvalue (see :meth:`_needs_verification`).
        """
        m, b, k = self.filled, self.b, self.k
        n_keep = k if verify else min(max(k, self.m_max // 2), m, self.m_max - b)
        keep = order[:n_keep]
        lock = set(order[:n_converged].tolist()) | set(range(self.n_locked))
        keep_locked = [c for c in keep if c in lock]
        keep_free = [c for c in keep if c not in lock]
        columns = np.array(keep_locked + keep_free, dtype=np.int64)
        n_lock = len(keep_locked)
        s_keep = self._ritz_vectors(s_active, columns)
        device, dtype = self.basis.device, self.basis.dtype
        s_keep_dev = s_keep.to(device=device, dtype=dtype)
        # Basis-sized products through ops.gemm (oneDNN on the CPU), in place over the first
        # n_keep columns: Y = V S, and (H V) S beside it.
        basis_view = self.basis[:, :m]
        gram = _rotate_in_place(basis_view, s_keep_dev, gram=True).cpu()
        if self.products_t is not None:
            _rotate_in_place(self.products_t[:m].T, s_keep_dev, gram=False)
        # T of the new basis: diag(theta_kept), coupled to the pending block by B_last S_last.
        kept_t = torch.diag(torch.from_numpy(theta[columns]))
        arrow = coupling @ s_keep[m - b :, :]
        # Y = V S in the working dtype adds ~u sqrt(m) to Y^T Y - I at each restart, and the
        # error is carried into the next Y: measured up to 1e-6 after a few hundred fp32
        # restarts. When Y^T Y - I exceeds 2 eps, one Cholesky QR pass (fp64 Gram) restores
        # it. T follows the Krylov relation H Y = Y T + Q A, the identity the expansion keeps:
        # Y' = Y R^{-1} gives H Y' = Y' (R T R^{-1}) + Q (A R^{-1}), whose diagonal is still
        # theta (R is triangular). (R^{-T} T R^{-1}, the projection view, would rescale each
        # theta by 1/||y||^2 and drift the locked values by ~1e-7 per restart in fp32.)
        eye = torch.eye(n_keep, dtype=torch.float64)
        if float((gram - eye).abs().max()) > 2 * torch.finfo(dtype).eps:
            factor, info = torch.linalg.cholesky_ex(gram, upper=True)
            if int(info) == 0:
                factor_inv = torch.linalg.solve_triangular(factor, eye, upper=True)
                factor_inv_dev = factor_inv.to(device=device, dtype=dtype)
                _rotate_in_place(self.basis[:, :n_keep], factor_inv_dev, gram=False)
                if self.products_t is not None:
                    _rotate_in_place(self.products_t[:n_keep].T, factor_inv_dev, gram=False)
                kept_t = factor @ kept_t @ factor_inv
                kept_t = 0.5 * (kept_t + kept_t.T)
                arrow = arrow @ factor_inv
        if verify:
            pending = random_orthonormal_block(self.basis[:, :n_keep], b, self.generator)
        else:  # the block after the basis, through a copy: its slot may overlap its new one
            pending = torch.empty(self.basis.shape[0], b, dtype=dtype, device=device)
            copy_block(pending, self.basis[:, m : m + b])
        copy_block(self.basis[:, n_keep : n_keep + b], pending)
        # Deflate the locked pairs: their couplings are residual-sized (or, from the change of
        # basis above, O(eps ||H||)); the locked block stays diagonal.
        locked_theta = kept_t.diagonal()[:n_lock].clone()
        kept_t[:n_lock, :] = 0.0
        kept_t[:, :n_lock] = 0.0
        kept_t[range(n_lock), range(n_lock)] = locked_theta
        arrow[:, :n_lock] = 0.0
        if verify:
            arrow.zero_()  # a random block is not a Krylov residual: no coupling
        new_t = torch.zeros(n_keep + b, n_keep, dtype=torch.float64)
        new_t[:n_keep, :n_keep] = kept_t
        new_t[n_keep:, :] = arrow
        self.projected.zero_()
        self.projected[: n_keep + b, :n_keep] = new_t.to(device)
        self.projected[:n_keep, n_keep : n_keep + b] = arrow.T.to(device)
        self.locked_theta = locked_theta.numpy()
        self.locked_bound = bounds[columns[:n_lock]].copy()
        self.n_locked = n_lock
        self.filled = n_keep
        self.restarts += 1
        self.local_ready = False

    def run(self) -> LanczosResult:
        op, b, k = self.op, self.b, self.k
        start = torch.randn(op.dim, b, generator=self.generator, dtype=op.dtype)
        q, _, info = cholqr2(start.to(op.device))
        if bool(info.deficient):  # pragma: no cover - a Gaussian block is full rank
            raise RuntimeError("block Lanczos: the random start block is rank deficient")
        self.basis[:, :b] = q
        try:
            while True:
                self._fill()
                if self._too_few_to_check():
                    continue
                theta, s_active, bounds, coupling, order, n_converged = self._rayleigh_ritz()
                stop = False
                if self.callback is not None:
                    stop = bool(self.callback(self._cycle_info(theta, bounds, order, n_converged)))
                if self.pbar is not None:
                    self.pbar.set_postfix(converged=f"{n_converged}/{k}", restarts=self.restarts)
                out_of_budget = self.n_matvecs + b > self.budget - self.reserve
                verify = False
                if n_converged >= k and not (stop or out_of_budget):
                    verify = self._needs_verification(theta, order)
                if (n_converged >= k and not verify) or stop or out_of_budget:
                    return self._finish(theta, s_active, bounds, order)
                if not verify and self.can_expand():
                    continue  # convergence checked mid-cycle: keep expanding
                if verify:
                    # Everything wanted is locked: lock it all, search with a random block.
                    n_converged = k
                    self.verified_values = theta[order[:k]].copy()
                self._restart(theta, s_active, bounds, coupling, order, n_converged, verify=verify)
                self.cycle += 1
                self.block_in_cycle = 0
        finally:
            if self.pbar is not None:
                self.pbar.close()

    def _too_few_to_check(self) -> bool:
        """Skip a convergence check that cannot succeed: fewer Ritz values than ``k`` (the
        wanted prefix cannot be complete) while the basis and the budget still have room and
        no callback wants to see the cycle. MLP k = 10: 9 of 21 checks, ~3 ms of a 0.23 s
        solve."""
        return self.callback is None and self.filled < self.k and self.can_expand()

    def _needs_verification(self, theta: np.ndarray, order: np.ndarray) -> bool:
        """Could a multiple eigenvalue hide copies the block Krylov space cannot see?

        From a random start, a block Krylov space with ``b`` columns holds, in exact
        arithmetic, at most ``b`` copies of an eigenvalue (its start block's projection on the
        eigenspace has rank ``min(b, multiplicity)``), and the residuals of the copies it
        found cannot reveal the others. So when a converged cluster of ``>= b`` equal Ritz
        values sits *inside* the wanted list (a missed copy would push a wanted value out),
        one more cycle runs from a random block orthogonal to the locked vectors. It stops
        when such a cycle leaves the wanted values unchanged. Values count as equal within
        ``max(10 tol, 1e4 eps) * ||H||_est``: copies converge together to that level, and
        distinct values that close are as hard for a Krylov method as true copies.
        """
        k, b = self.k, self.b
        wanted = theta[order[:k]]
        eps = torch.finfo(self.op.dtype).eps
        delta = max(10.0 * self.tol, 1e4 * eps) * self.h_norm
        previous = self.verified_values
        if previous is not None and np.all(np.abs(wanted - previous) <= delta):
            return False  # the last search found nothing new
        # A cluster of one is no evidence of a multiple eigenvalue (with b = 1 every value
        # would be one, and a whole extra cycle would be spent on every solve).
        for i in range(k - 1):
            members = np.flatnonzero(np.abs(wanted - wanted[i]) <= delta)
            if len(members) >= max(b, 2) and members.max() < k - 1:
                return True
        return False

    def _cycle_info(self, theta, bounds, order, n_converged) -> LanczosCycle:
        wanted = order[: self.k]
        scale = self.h_norm if self.h_norm > 0 else 1.0
        return LanczosCycle(
            cycle=self.cycle,
            n_matvecs=self.n_matvecs,
            restarts=self.restarts,
            basis_columns=self.filled,
            n_converged=n_converged,
            ritz_values=torch.from_numpy(theta[wanted].copy()),
            ritz_bounds=torch.from_numpy(bounds[wanted] / scale),
            h_norm=self.h_norm,
            basis=self.basis[:, : self.filled + self.b],
        )

    def _finish(self, theta, s_active, bounds, order) -> LanczosResult:
        op, k = self.op, self.k
        wanted = order[:k]
        s64 = self._ritz_vectors(s_active, wanted)
        values = torch.from_numpy(theta[wanted].copy())
        products = None if self.products_t is None else self.products_t[: self.filled]
        residuals = None
        if op.device.type == "cpu":
            # One pass over V and H V for X = V S and ||(H V) s_i - theta_i x_i|| (the
            # ritz_vectors op): MLP k = 10, 10 -> 3 ms against a GEMM and chunked residuals.
            vectors, squares = ops.ritz_vectors(
                self.basis[:, : self.filled], None if products is None else products.T, s64, values
            )
            if products is not None:
                residuals = squares.sqrt()
        else:
            s = s64.to(device=op.device, dtype=op.dtype)
            vectors = gemm(self.basis[:, : self.filled], s)
            if products is not None:
                residuals = _stored_residuals(products, s, vectors, values)
        if residuals is None:
            residuals = _true_residuals(op, vectors, values, self)
        scale = self.h_norm if self.h_norm > 0 else 1.0
        device = op.device
        return LanczosResult(
            eigenvalues=values.to(device),
            eigenvectors=vectors,
            residuals=(residuals / scale).to(device),
            ritz_bounds=torch.from_numpy(bounds[wanted] / scale).to(device),
            converged=torch.from_numpy(bounds[wanted] <= self.tol * self.h_norm).to(device),
            n_matvecs=self.n_matvecs,
            restarts=self.restarts,
            h_norm=self.h_norm,
            block_size=self.b,
            basis_size=self.m_max,
        )


def _stored_residuals(products_t, s, vectors, values) -> torch.Tensor:
    """``||(H V) s_i - theta_i V s_i||`` (float64, CPU) from the stored products ``H V``.

    The same quantity as :func:`_true_residuals` without the matvecs: ``H y = H (V s)`` is
    ``(H V) s`` by linearity, and ``H V`` holds the operator's own outputs, not the Krylov
    relation the Ritz bounds come from, so a loss of orthogonality, an asymmetric or
    inconsistent operator still shows. The two differ by rounding: forming ``(H V) s`` in the
    working dtype adds ~``u sqrt(m) ||H||`` (2e-7 relative in float32 for ``m`` = 100), as
    far below the default ``tol`` as the rounding of a fresh product.

    ``products_t`` is the ``(m, n)`` transposed store; ``(H V) s`` is formed a chunk of
    columns at a time (see :func:`_rotate_in_place`) and never held whole.
    """
    k = s.shape[1]
    device, dtype = vectors.device, vectors.dtype
    scale = values.to(device=device, dtype=dtype).view(k, 1)
    squares = torch.zeros(k, dtype=torch.float64, device=device)
    for start, stop, out in _column_chunk_products(products_t, s):
        out -= vectors[start:stop].T * scale
        squares += torch.linalg.vector_norm(out, dim=1, dtype=torch.float64).square()
    return squares.sqrt().cpu()


def _true_residuals(op: _Operator, vectors, values, state) -> torch.Tensor:
    """``||H v_i - lambda_i v_i||`` (float64, CPU) from one block product of all ``k`` vectors."""
    product = op(vectors.contiguous())
    if product.data_ptr() == vectors.data_ptr():
        product = product.clone()  # an operator that returns its input (the identity)
    state.n_matvecs += vectors.shape[1]
    if state.pbar is not None:
        state.pbar.update(vectors.shape[1])
    if not bool(torch.isfinite(product).all()):
        raise FloatingPointError(
            "block Lanczos: the operator returned a non-finite value in the final residual "
            f"product (after {state.n_matvecs} matvecs)"
        )
    # In the working dtype: rounding adds ~u * ||H|| to each residual, the operator's own floor.
    product -= vectors * values.to(device=vectors.device, dtype=vectors.dtype)
    return torch.linalg.vector_norm(product, dim=0, dtype=torch.float64).cpu()


def _check_basis_fits(op: _Operator, k: int, b: int, m_max: int, store_products: bool) -> None:
    """A MemoryError naming the settings when the basis and its companions cannot fit: the
    basis, the stored products, three block buffers and the ``k`` Ritz vectors (memory the
    buffer cache would hand over counts as free)."""
    itemsize = torch.empty(0, dtype=op.dtype).element_size()
    products = m_max * op.dim * itemsize if store_products else 0
    need = (m_max + b + 3 * b + k) * op.dim * itemsize + products
    sizes = [(m_max + b) * op.dim] + ([m_max * op.dim] if store_products else [])
    cached = buffers.reusable_bytes(sizes, op.dtype, op.device)
    advice = (
        f"ask for fewer eigenpairs (k = {k}); block_lanczos also takes a smaller basis_size "
        f"(now {m_max})"
    )
    if products:
        advice += f" or store_products=False (saves {products / 2**30:.3g} GiB for k products)"
    _memory.check_fits(
        max(0, need - cached),
        op.device,
        f"the Krylov basis of {m_max + b} vectors of dim {op.dim} (k = {k}, block {b})",
        advice,
    )


def _direct_solve(op: _Operator, k, which, b, budget, pbar_enabled) -> LanczosResult:
    """``dim <= basis``: form ``H`` from ``dim`` products of identity blocks and ``eigh`` it.

    A Krylov basis would have to fill the whole space anyway; this is exact and just as cheap.
    """
    n, dtype, device = op.dim, op.dtype, op.device
    if budget is not None and budget < n:
        raise ValueError(
            f"dim = {n} is not larger than the Krylov basis, so the solver forms the operator "
            f"with {n} matvecs, more than max_matvecs = {budget}; raise max_matvecs or pass a "
            "smaller basis_size"
        )
    dense = torch.empty(n, n, dtype=torch.float64)
    pbar = None
    if pbar_enabled:
        from tqdm.auto import tqdm

        pbar = tqdm(total=n, unit="matvec", desc="block Lanczos (direct)")
    try:
        for index, start in enumerate(range(0, n, b)):
            cols = min(b, n - start)
            unit = torch.zeros(n, cols, dtype=dtype, device=device)
            unit[start : start + cols].fill_diagonal_(1.0)
            product = op(unit)
            if not bool(torch.isfinite(product).all()):
                raise FloatingPointError(
                    "block Lanczos: the operator returned a non-finite value while forming it "
                    f"directly (dim {n} <= basis), block {index} (columns {start}:{start + cols})"
                )
            dense[:, start : start + cols] = product.to(torch.float64).cpu()
            if pbar is not None:
                pbar.update(cols)
    finally:
        if pbar is not None:
            pbar.close()
    scale = float(dense.abs().max())
    asym = float((dense - dense.T).abs().max())
    if scale > 0 and asym > _symmetry_rtol(dtype) * scale:
        raise ValueError(
            f"the operator is not symmetric: H differs from H^T by {asym:.3g} (scale "
            f"{scale:.3g}); block Lanczos needs a symmetric operator"
        )
    theta, s = torch.linalg.eigh(0.5 * (dense + dense.T))
    order = _wanted_order(theta.numpy(), which)[:k]
    h_norm = float(theta.abs().max())
    values = theta[order]
    vectors = s[:, order].to(dtype)
    # Residuals of the returned (possibly fp32) vectors against the measured operator.
    vectors64 = vectors.to(torch.float64)
    residuals = torch.linalg.vector_norm(dense @ vectors64 - vectors64 * values, dim=0)
    norm = h_norm if h_norm > 0 else 1.0
    return LanczosResult(
        eigenvalues=values.to(device),
        eigenvectors=vectors.to(device),
        residuals=(residuals / norm).to(device),
        ritz_bounds=torch.zeros(k, dtype=torch.float64, device=device),
        converged=torch.ones(k, dtype=torch.bool, device=device),
        n_matvecs=n,
        restarts=0,
        h_norm=h_norm,
        block_size=b,
        basis_size=n,
    )


def default_block_size(k: int, device: torch.device | str = "cpu") -> int:
    """The default block size for ``k`` wanted pairs on ``device``.

    On a GPU a block product costs little more than one product for the project's models, so
    the block is ``min(k, 16)``: wide enough for the ~C outlier eigenvalues of a C-class
    softmax net (notes 3.5) and for GEMM tiles. On a CPU a product is compute-bound already
    for one vector (per-vector time of the fused MLP HVP, batch 1024, one thread: 23 ms at
    b = 1, 20 ms at b = 8), so what counts is the number of products, and single-vector
    Lanczos needs the fewest: 25 for k = 10 on the trained MLP against 38 at b = 2, 56 at
    b = 4 and 100 at b = 10 (tol 1e-4, checking every block). Beyond k = 16 the full
    reorthogonalization against a basis of several k columns costs about as much as a product
    on a CPU (k = 32 on the trained MLP, 266,610 weights, one thread: 9-12 ms per
    orthogonalization step of a block of 4, against ~29 ms per block product), so small
    blocks share it. Measured at k = 32, tol 1e-4, one thread, each block at its default
    basis size (products / seconds): MLP b = 8: 320 / 4.4 s, b = 4: 264 / 4.1 s, b = 2:
    220 / 4.7 s; b = 1 193 / 3.60 s against b = 4 264 / 3.49 s in one later run (35 s for b = 1
    before the column-major and skinny kernels); small CNN (20,490 weights, product-bound):
    b = 8: 216 / 18.3 s, b = 4: 180 / 14.8 s, b = 2: 172 / 14.0 s. Blocks of 4 need close to
    the fewest products at the solver cost of the widest block, up to k = 64; 16 beyond.
    Single vectors are now as fast for the MLP at k = 32 with 27 percent fewer products, but
    on the small CNN at k = 32 they stopped at 140 products (8.1 s, against 180 / 10.1 s for
    b = 4) with eigenvalues wrong by more than 1e-4 of lambda_1. In a later run of the same
    solve the values from the 19th on lay below the true ones, four of them by 1.2e-4 to
    3.4e-4 of lambda_1: in the dense tail near 1.4 (lambda_1 = 94.4) the single vector's
    space had converged to the 34th eigenvalue before some inside the wanted 32. A
    single-vector Krylov space misses copies of clustered values, which is what the block is
    for. Blocks of 3 have no vectorized kernels: MLP k = 32, 258 products in 4.66 s. So 4
    stays.

    A block holds at most ``b`` copies of a multiple eigenvalue; pass ``block_size`` at least
    the multiplicity expected among the wanted pairs.
    """
    if torch.device(device).type != "cpu":
        return max(1, min(k, DEFAULT_MAX_BLOCK))
    if k <= 16:
        return 1
    return 4 if k <= 64 else DEFAULT_MAX_BLOCK


def default_check_every(device: torch.device | str, basis_size: int, block_size: int) -> int:
    """Blocks expanded between convergence checks by default: 1 on the CPU, where the check's
    host synchronization costs nothing and a solve can stop at the first block that completes
    the wanted pairs (MLP k = 10: 21 products, against up to a cycle's more); on other devices
    a whole cycle (``basis_size // block_size`` blocks, more than a cycle after a restart
    holds), so a solve synchronizes with the host once per restart cycle, for the convergence
    decision (notes/kernel_design.md 3.2), and a cycle's steps queue without waiting."""
    if torch.device(device).type == "cpu":
        return 1
    return max(1, basis_size // block_size)


def default_basis_size(k: int, block_size: int) -> int:
    """The default basis size ``m_max``, a multiple of ``b``.

    ``b = 1``: ``max(2k + 10, 20)``, ARPACK's ``ncv = max(2k + 1, 20)`` plus a margin: with
    convergence checked at every step the basis is rarely filled (25 products for k = 10 on
    the trained MLP), and a restart just before convergence costs a Rayleigh-Ritz update of
    the basis for nothing. Blocks: ``max(4k, k + 4b)`` rounded up (notes 3.5). Measured at
    k = 32, b = 4 on the trained MLP (tol 1e-4, one thread, one run; products, restarts,
    seconds): m = 96: 276, 5, 3.66 s; 112: 272, 4, 3.73 s; 128 (the default): 264, 4, 3.61 s;
    144: 264, 3, 3.71 s; 160: 260, 3, 3.77 s; 192: 260, 2, 3.82 s. A smaller basis restarts more
    and needs more products; a larger one saves at most 4 products and pays for them in
    longer orthogonalization sweeps.
    """
    if block_size == 1:
        return max(2 * k + 10, 20)
    m = max(4 * k, k + 4 * block_size)
    return int(math.ceil(m / block_size) * block_size)


def block_lanczos(
    matmat: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | Any,
    dim: int,
    k: int,
    *,
    which: str = "LA",
    tol: float = 1e-4,
    block_size: int | None = None,
    max_matvecs: int | None = None,
    basis_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool | str = False,
    callback: Callable[[LanczosCycle], bool | None] | None = None,
    check_every: int | None = None,
    store_products: bool = True,
    orthogonalization: str = "auto",
) -> LanczosResult:
    """``k`` extreme eigenpairs of a symmetric operator by thick-restart block Lanczos.

    Args:
        matmat: the operator ``H``: a callable mapping a ``(dim, b)`` block to ``H @ block``,
            a dense ``(dim, dim)`` tensor, a sparse COO/CSR tensor, or an object with
            ``.matmat`` or ``@``. It must be symmetric and must not modify its input (which
            may be a view of the solver's basis); the solver may overwrite the blocks it
            returns.
        dim: the operator's dimension ``n``.
        k: eigenpairs wanted, ``0 < k < dim``.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude.
        tol: a pair converges when its Ritz residual bound is at most ``tol * ||H||_est``
            (``||H||_est``: the largest ``|theta|`` seen). ``1e-4`` suits float32 operators;
            below ~1e-6 a float32 run may stall at rounding level (use float64).
        block_size: ``b``; default :func:`default_block_size`: ``min(k, 16)`` on GPUs; on
            CPUs 1 up to ``k = 16`` (fewest products), then 4 up to ``k = 64``, then 16. A
            ``b``-wide Krylov space holds at most ``b`` copies of a multiple eigenvalue: pick
            at least the multiplicity of any repeated eigenvalue among the wanted ones.
        max_matvecs: cap on operator applications, every column of a block product counted
            (with ``store_products=False`` the ``k`` of the final residual product included).
            Default: enough for the first cycle and 50 restarts. Pairs not converged when it
            is reached come back with ``converged`` False.
        basis_size: ``m_max``; default :func:`default_basis_size` (``max(2k + 10, 20)`` for
            ``b = 1``, else ``max(4k, k + 4b)``), rounded up to a multiple of ``b``.
            When ``dim <= m_max + b`` the operator is formed from ``dim`` products and solved
            directly (exact; a Krylov basis would fill the space anyway).
        seed: seed of the start block and of any random replacement directions (drawn on the
            CPU, then moved, so a run is bitwise reproducible on a given device).
        dtype: dtype of the basis and the products, float32 or float64. Default: the
            matrix's dtype for a tensor operator, ``operator.dtype`` if it has one, else
            float32. ``T``, the projections and the Grams are float64 regardless.
        device: device of the basis; default the operator's device (tensor or ``.device``),
            else CPU.
        progress: show a tqdm bar over matvecs (a string: with that description).
        callback: called at each convergence check with a :class:`LanczosCycle`; returning
            True stops the solve (the current Ritz pairs are returned).
        check_every: blocks expanded between convergence checks (each check is one host
            synchronization and an ``eigh`` of at most ``m_max`` rows). Default
            (:func:`default_check_every`): every block on the CPU, where a synchronization
            costs nothing and stopping at the first converged block saves products; once per
            restart cycle (when the basis is full) elsewhere, so a GPU solve synchronizes with
            the host once per cycle.
        store_products: keep ``H V`` beside the basis (twice the basis memory) so that the
            final residuals cost no matvec; False measures them with one more block product
            of the ``k`` vectors.
        orthogonalization: ``"two_pass"`` (BCGS2, no host synchronization inside a step),
            ``"adaptive"`` (local pass, one full projection, a second only when the DGKS test
            asks; one synchronization per step), or ``"auto"``: adaptive on CPU, two-pass
            elsewhere.

    Returns:
        A :class:`LanczosResult`.

    Raises:
        ValueError: ``k <= 0``, ``k >= dim``, an unknown ``which``, ``tol`` not in (0, 1),
            a bad ``block_size``/``basis_size``/``max_matvecs``, or a non-symmetric operator.
        TypeError: an unsupported operator or dtype (a matrix that is not floating point),
            a seed that is not an int.
        FloatingPointError: the operator produced NaN or inf (the message names the restart
            cycle and the block).
        MemoryError: the basis (or, when ``dim`` is not larger than the basis, the dense
            operator) cannot fit in the memory available; raised before anything is
            allocated, with what to change.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = block_lanczos(A, 100, 3, tol=1e-10)
        >>> [round(v, 8) for v in res.eigenvalues.tolist()]
        [100.0, 99.0, 98.0]
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0 or k >= dim:
        raise ValueError(f"k must be an integer with 0 < k < dim = {dim}, got {k!r}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if basis_size is not None and (isinstance(basis_size, bool) or not isinstance(basis_size, int)):
        raise ValueError(f"basis_size must be an integer, got {basis_size!r}")
    if max_matvecs is not None and (
        isinstance(max_matvecs, bool) or not isinstance(max_matvecs, int) or max_matvecs < 1
    ):
        raise ValueError(f"max_matvecs must be a positive integer, got {max_matvecs!r}")
    if check_every is not None and (
        isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1
    ):
        raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
    if orthogonalization not in ORTHOGONALIZATION:
        raise ValueError(
            f"orthogonalization must be one of {', '.join(ORTHOGONALIZATION)}, "
            f"got {orthogonalization!r}"
        )
    seed = check_seed(seed)
    op = _Operator(matmat, dim, dtype, device)
    b = default_block_size(k, op.device) if block_size is None else block_size
    if basis_size is None:
        m_max = default_basis_size(k, b)
    else:
        m_max = int(math.ceil(basis_size / b) * b)
        if m_max < k + b:
            raise ValueError(
                f"basis_size must hold the k = {k} wanted vectors plus one block of {b}; "
                f"got {basis_size}"
            )
    if check_every is None:
        check_every = default_check_every(op.device, m_max, b)
    if orthogonalization == "auto":
        # Host synchronizations cost nothing when the device is the host.
        orthogonalization = "adaptive" if op.device.type == "cpu" else "two_pass"
    generator = torch.Generator().manual_seed(seed)
    if dim <= m_max + b:
        # The dense float64 operator, the symmetrized copy and eigh's vectors and workspace.
        _memory.check_fits(
            4 * dim * dim * 8,
            torch.device("cpu"),
            f"forming the {dim} x {dim} operator densely (dim = {dim} is not larger than the "
            f"Krylov basis of {m_max + b} columns for k = {k})",
            "ask for fewer eigenpairs (k); block_lanczos also takes a smaller basis_size",
        )
        return _direct_solve(op, k, which, b, max_matvecs, progress)
    _check_basis_fits(op, k, b, m_max, store_products)
    n_keep = max(k, m_max // 2)
    reserve = 0 if store_products else k
    if max_matvecs is None:
        budget = m_max + DEFAULT_MAX_RESTARTS * (m_max - n_keep) + reserve
    else:
        budget = max_matvecs
        if budget < reserve + b:
            what = f"one block of {b}" + (
                "" if store_products else f" plus the final residual product of the k = {k} vectors"
            )
            raise ValueError(
                f"max_matvecs = {budget} leaves no room for {what}; give at least {reserve + b}"
            )
    solver = _BlockKrylovSchur(
        op,
        k,
        which,
        tol,
        b,
        m_max,
        budget,
        generator,
        progress,
        callback,
        check_every=check_every,
        store_products=store_products,
        orthogonalization=orthogonalization,
    )
    result = solver.run()
    solver.release()
    return result
