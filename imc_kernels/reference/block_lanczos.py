"""Pure-PyTorch twin of the block Lanczos solver :func:`imc_kernels.linalg.block_lanczos`.

The solver is Python over three dispatched kernel families: ``tsmm`` (the fp64-accumulating
``x^T y`` of every projection and Gram), ``block_orth`` (one block orthogonalization step,
BCGS2 with CholeskyQR and the rank check) and ``gemm`` (the basis-sized products of the
restarts; oneDNN on the CPU, see :func:`imc_kernels.ops.gemm`). Everything else it does (the
operator products, ``T``, its ``eigh``, restarts, locking, rank repair) is PyTorch already. The
twin runs the very same algorithm, line for line, with those families forced to their reference
implementations (:mod:`imc_kernels.reference.tsmm`, :mod:`imc_kernels.reference.block_orth`,
:mod:`imc_kernels.reference.gemm`)
through :func:`imc_kernels._dispatch.force_backend`, so it cannot drift from the solver: a
change to the algorithm changes both, and what remains to compare is the kernels' arithmetic.

The operator is the caller's and keeps its own dispatch: the kernels of a
:class:`~imc_kernels.HessianOperator` (Triton on a GPU, say) run as they would for the
solver, so both paths see the same products and differ only by the rounding of the
solver's own kernels. The extension path must match this twin to that rounding: eigenvalues
to float32 rounding, eigenvectors up to sign, the same number of products
(``tests/linalg/test_reference_solver.py``).

The forcing is scoped to the call and to the calling thread (a context variable), so a solve
running beside it on another thread keeps the extension.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from imc_kernels import _dispatch
from imc_kernels.linalg.block_lanczos import LanczosCycle, LanczosResult
from imc_kernels.linalg.block_lanczos import block_lanczos as _extension_block_lanczos

# The op families (the names imc_kernels.ops passes to _dispatch.select) the solver calls;
# tests/linalg/test_reference_solver.py checks that no compiled op runs inside the twin.
SOLVER_OPS = ("tsmm", "block_orth", "lanczos_vector", "ritz", "gemm")


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
    """Reference of :func:`imc_kernels.linalg.block_lanczos`: same arguments, same result type.

    Runs the solver with its kernel families (:data:`SOLVER_OPS`) on their pure-PyTorch
    reference implementations; the operator's own kernels are not touched (module docstring).
    The arguments, defaults, return value and exceptions are those of
    :func:`imc_kernels.linalg.block_lanczos`, which documents them in full.

    Args:
        matmat: the symmetric operator: a callable on ``(dim, b)`` blocks, a dense or sparse
            tensor, or an object with ``.matmat`` or ``@``.
        dim: the operator's dimension.
        k: eigenpairs wanted, ``0 < k < dim``.
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
        tol: convergence tolerance on the Ritz residual bound relative to ``||H||_est``.
        block_size: ``b``; default :func:`imc_kernels.linalg.block_lanczos.default_block_size`.
        max_matvecs: cap on operator applications.
        basis_size: ``m_max``; default
            :func:`imc_kernels.linalg.block_lanczos.default_basis_size`.
        seed: seed of the start block and of random replacement directions.
        dtype: float32 or float64 basis and products.
        device: device of the basis.
        progress: show a tqdm bar over matvecs.
        callback: called at each convergence check; returning True stops the solve.
        check_every: blocks expanded between convergence checks.
        store_products: keep ``H V`` for the final residuals.
        orthogonalization: ``"auto"``, ``"two_pass"`` or ``"adaptive"``.

    Returns:
        A :class:`~imc_kernels.linalg.LanczosResult`.

    Raises:
        ValueError, TypeError, FloatingPointError: as :func:`imc_kernels.linalg.block_lanczos`.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = block_lanczos(A, 100, 3, tol=1e-10)
        >>> [round(v, 8) for v in res.eigenvalues.tolist()]
        [100.0, 99.0, 98.0]
    """
    with _dispatch.force_backend("reference", ops=SOLVER_OPS):
        return _extension_block_lanczos(
            matmat,
            dim,
            k,
            which=which,
            tol=tol,
            block_size=block_size,
            max_matvecs=max_matvecs,
            basis_size=basis_size,
            seed=seed,
            dtype=dtype,
            device=device,
            progress=progress,
            callback=callback,
            check_every=check_every,
            store_products=store_products,
            orthogonalization=orthogonalization,
        )
