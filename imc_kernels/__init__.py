"""imc_kernels: fast, exact Hessian spectral kernels for PyTorch.

Public API (DESIGN section 3)::

    H = imc_kernels.HessianOperator(model, loss_fn, batch, curvature="hessian", engine="auto")
    H @ v                                 # (dim,) or (dim, b)
    imc_kernels.hvp(model, loss_fn, batch, v)
    imc_kernels.build_info()              # what is active: extension, Triton mode, versions
"""

from imc_kernels import (
    hvp,  # a callable module: imc_kernels.hvp(model, loss_fn, batch, v)
    linalg,
    ops,
    reference,
)
from imc_kernels._build_info import build_info
from imc_kernels._version import __version__
from imc_kernels.hvp import HessianOperator
from imc_kernels.spectral import spectral_density, top_eigvecs

__all__ = [
    "HessianOperator",
    "__version__",
    "build_info",
    "hvp",
    "linalg",
    "ops",
    "reference",
    "spectral_density",
    "top_eigvecs",
]
