"""imc_kernels: fast, exact Hessian spectral kernels for PyTorch.

Public API (DESIGN section 3)::

    H = imc_kernels.HessianOperator(model, loss_fn, batch, curvature="hessian", engine="auto")
    H @ v                                 # (dim,) or (dim, b)
    imc_kernels.hvp(model, loss_fn, batch, v)
    imc_kernels.build_info()              # what is active: extension, Triton mode, versions
    imc_kernels.distributed.DistributedHessianOperator(model, loss_fn, shard)  # data-parallel
    opt = imc_kernels.MaskedAdam.from_model(model, masks, lr=1e-3)  # masked weights stay 0
"""

from imc_kernels import (
    distributed,
    hvp,  # a callable module: imc_kernels.hvp(model, loss_fn, batch, v)
    linalg,
    masked,
    ops,
    reference,
    sparse,
)
from imc_kernels._build_info import build_info
from imc_kernels._version import __version__
from imc_kernels.hvp import HessianOperator
from imc_kernels.masked import (
    MaskedAdam,
    MaskedAdamW,
    MaskedConv2d,
    MaskedLinear,
    MaskedSGD,
    mask_model,
)
from imc_kernels.spectral import spectral_density, top_eigvecs

__all__ = [
    "HessianOperator",
    "MaskedAdam",
    "MaskedAdamW",
    "MaskedConv2d",
    "MaskedLinear",
    "MaskedSGD",
    "__version__",
    "build_info",
    "distributed",
    "hvp",
    "linalg",
    "mask_model",
    "masked",
    "ops",
    "reference",
    "sparse",
    "spectral_density",
    "top_eigvecs",
]
