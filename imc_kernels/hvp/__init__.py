"""Hessian-vector products: :class:`HessianOperator`, its engines and per-layer rules.

``imc_kernels.hvp`` is both this package and a function: ``imc_kernels.hvp(model, loss_fn,
batch, v)`` is the one-call product (DESIGN section 3), and ``imc_kernels.hvp.HessianOperator``
still reaches the package's contents.
"""

import sys
import types

from imc_kernels.hvp.operator import HessianOperator, hvp

__all__ = ["HessianOperator", "hvp"]


class _CallableModule(types.ModuleType):
    def __call__(self, model, loss_fn, batch, v, **kwargs):
        return hvp(model, loss_fn, batch, v, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
