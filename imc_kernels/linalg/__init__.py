"""Eigensolvers and spectral densities for symmetric operators (DESIGN sections 3 and 6).

* :func:`block_lanczos`: thick-restart block Lanczos for a few extreme eigenpairs.
* :func:`slq`, :func:`density_on_grid`, :func:`cumulative_count`: stochastic Lanczos
  quadrature for the spectral density.
* :mod:`imc_kernels.linalg.orthogonalize`: the tall-skinny orthogonalization they rest on.
* :mod:`imc_kernels.linalg.buffers`: solver buffers kept from one CPU solve to the next
  (``buffers.empty_cache()`` frees them).
"""

from imc_kernels.linalg import buffers
from imc_kernels.linalg.block_lanczos import (
    LanczosCycle,
    LanczosResult,
    block_lanczos,
    expand_block,
)
from imc_kernels.linalg.orthogonalize import (
    block_cgs2,
    block_orthonormalize,
    cholqr,
    cholqr2,
    svqb,
)
from imc_kernels.linalg.slq import SLQResult, cumulative_count, density_on_grid, slq

__all__ = [
    "LanczosCycle",
    "LanczosResult",
    "SLQResult",
    "block_cgs2",
    "block_lanczos",
    "block_orthonormalize",
    "buffers",
    "cholqr",
    "cholqr2",
    "cumulative_count",
    "density_on_grid",
    "expand_block",
    "slq",
    "svqb",
]
