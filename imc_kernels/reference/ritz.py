"""Pure-PyTorch twin of the ``imc_kernels::ritz_vectors`` C++ op (``csrc/lanczos/ritz_cpu.cpp``).

The last step of a Lanczos solve: with the basis ``V`` (``(n, m)``), the stored products
``P = H V`` (``(n, m)``, optional), the Ritz coefficients ``S`` (``(m, k)``, float64) and the
Ritz values ``theta`` (``(k,)``, float64)::

    X = V S                                  (the Ritz vectors, (n, k), the working dtype)
    squares_i = ||P s_i - theta_i x_i||^2    (float64; only with P)

``S`` and ``theta`` are rounded to the working dtype once; ``X`` and ``P S`` are formed in it and
the squares accumulated in float64 (here by upcasting the residual). The compiled kernel does the
same in one pass over ``V`` and ``P`` (the sums in another order: equal up to rounding).
Returns ``(X, squares)``; ``squares`` is an empty float64 tensor without products.
"""

from __future__ import annotations

import torch


def check_inputs(basis, products, s, theta) -> None:
    """Validate the arguments of :func:`ritz_vectors` (the op's checks, as Python errors).

    Raises:
        TypeError: not tensors, wrong dtypes. ValueError: shapes that do not fit.
    """
    for name, t in (("basis", basis), ("s", s), ("theta", theta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ritz_vectors: {name} must be a tensor, got {type(t).__name__}")
    if basis.dim() != 2:
        raise ValueError(f"ritz_vectors needs a 2-D basis (n, m), got shape {tuple(basis.shape)}")
    if basis.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"ritz_vectors takes a float32 or float64 basis, got {basis.dtype}")
    m = basis.shape[1]
    if s.dim() != 2 or s.shape[0] != m:
        raise ValueError(f"ritz_vectors needs s of shape ({m}, k), got {tuple(s.shape)}")
    if s.dtype != torch.float64 or theta.dtype != torch.float64:
        raise TypeError(f"ritz_vectors needs float64 s and theta, got {s.dtype}, {theta.dtype}")
    if theta.dim() != 1 or theta.shape[0] != s.shape[1]:
        raise ValueError(
            f"ritz_vectors needs theta of shape ({s.shape[1]},), got {tuple(theta.shape)}"
        )
    if products is not None:
        if not isinstance(products, torch.Tensor):
            raise TypeError(f"ritz_vectors: products must be a tensor, got {type(products)}")
        if products.shape != basis.shape or products.dtype != basis.dtype:
            raise ValueError(
                f"ritz_vectors needs products like the basis ({tuple(basis.shape)}, "
                f"{basis.dtype}), got {tuple(products.shape)}, {products.dtype}"
            )
        if products.device != basis.device:
            raise ValueError(
                f"ritz_vectors needs products on the basis' device {basis.device}, got "
                f"{products.device}"
            )


def ritz_vectors(basis, products, s, theta) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, squares)`` as the module says."""
    s_w = s.to(device=basis.device, dtype=basis.dtype)
    vectors = (basis @ s_w).contiguous()
    if products is None:
        return vectors, torch.empty(0, dtype=torch.float64, device=basis.device)
    residual = products @ s_w
    residual -= vectors * theta.to(device=basis.device, dtype=basis.dtype)
    return vectors, residual.to(torch.float64).square().sum(0)
