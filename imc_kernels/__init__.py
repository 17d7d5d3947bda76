"""imc_kernels: fast, exact Hessian spectral kernels for PyTorch."""

from imc_kernels import ops, reference
from imc_kernels._version import __version__

__all__ = ["__version__", "ops", "reference"]
