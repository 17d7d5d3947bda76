"""The model-level spectral API: top eigenpairs and the spectral density of a loss Hessian.

* :func:`top_eigvecs`: a few extreme eigenpairs of the Hessian (or GGN) by thick-restart
  block Lanczos (:func:`imc_kernels.linalg.block_lanczos`) over a :class:`HessianOperator`.
* :func:`spectral_density`: stochastic Lanczos quadrature (:func:`imc_kernels.linalg.slq`),
  several probes advanced together through block products, each its own Lanczos run.

Both build the operator from ``(model, batch)`` or take a ready :class:`HessianOperator`,
run on the model's device and count every Hessian-vector product they spend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from imc_kernels.hvp import HessianOperator
from imc_kernels.linalg.block_lanczos import WHICH, block_lanczos, check_seed
from imc_kernels.linalg.slq import PROBES, cumulative_count, density_on_grid, slq

__all__ = ["EigenResult", "SpectralDensity", "spectral_density", "top_eigvecs"]


@dataclasses.dataclass
class EigenResult:
    """Eigenpairs from :func:`top_eigvecs`.

    Attributes:
        eigenvalues: ``(k,)`` float64 on the model's device: descending for ``"LA"``,
            ascending for ``"SA"``, by descending ``|lambda|`` for ``"LM"``.
        eigenvectors: ``(dim, k)`` orthonormal columns in the model's dtype and device, flat
            in the order of ``model.parameters()`` (trainable only).
        residuals: ``(k,)`` float64, ``||H v - lambda v|| / ||H||_est`` measured at the end
            from the operator's products (``||H||_est``: the largest ``|Ritz value|`` seen).
        n_hvps: Hessian-vector products spent (every column of every block product).
        converged: ``(k,)`` bool, the Ritz residual bound met ``tol``.
        restarts: thick restarts of the solver.
        ritz_bounds: ``(k,)`` float64 Ritz residual bounds, also relative to ``||H||_est``.
        h_norm: ``||H||_est``.
        block_size: the solver's block size.
        basis_size: the solver's basis size.
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
        operator: the :class:`HessianOperator` the solve ran on.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    n_hvps: int
    converged: torch.Tensor
    restarts: int
    ritz_bounds: torch.Tensor
    h_norm: float
    block_size: int
    basis_size: int
    which: str
    operator: Any = dataclasses.field(repr=False)

    @property
    def k(self) -> int:
        return int(self.eigenvalues.numel())

    @property
    def all_converged(self) -> bool:
        """True when every returned pair met the tolerance."""
        return bool(self.converged.all())

    def as_params(self, i: int) -> dict[str, torch.Tensor]:
        """Eigenvector ``i`` as ``{parameter name: tensor shaped like the parameter}``.

        Raises:
            IndexError: ``i`` outside ``[-k, k)``.
        """
        if isinstance(i, bool) or not isinstance(i, int) or not -self.k <= i < self.k:
            raise IndexError(f"eigenvector index {i!r} out of range for k = {self.k}")
        vector = self.eigenvectors[:, i].contiguous()
        if hasattr(self.operator, "as_params"):
            return self.operator.as_params(vector)
        raise TypeError(
            f"the operator {type(self.operator).__name__} has no parameter layout (as_params)"
        )


@dataclasses.dataclass
class SpectralDensity:
    """Gauss quadrature of the spectral density from :func:`spectral_density`.

    ``sum_j weights[p, j] f(nodes[p, j]) ~= q_p^T f(H) q_p`` for probe ``p`` (exact for
    polynomials of degree < ``2 * steps``); the mean over probes estimates ``tr f(H) / dim``.

    Attributes:
        nodes: ``(n_probes, steps)`` float64 (CPU), each probe's Ritz values, ascending (a
            probe whose Krylov space became invariant early repeats its last node, weight 0).
        weights: ``(n_probes, steps)`` float64 (CPU), rows summing to 1.
        n_hvps: Hessian-vector products spent.
        dim: the operator's dimension.
        lengths: ``(n_probes,)`` int64, each probe's Lanczos steps.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    n_hvps: int
    dim: int
    lengths: torch.Tensor

    @property
    def n_probes(self) -> int:
        return int(self.nodes.shape[0])

    def density(
        self, grid=None, sigma: float | None = None, n_grid: int = 1000
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gaussian-smoothed density on a grid and its cumulative distribution.

        Args:
            grid: points to evaluate at; default ``n_grid`` points spanning the nodes plus
                ``5 sigma`` on each side.
            sigma: Gaussian width; default 1 % of the nodes' range.
            n_grid: grid size when ``grid`` is None.

        Returns:
            ``(grid, density, cdf)`` float64 (CPU); the density integrates to 1 over the
            line, the cdf is its cumulative trapezoid normalized to end at 1.

        Raises:
            ValueError, TypeError: as :func:`imc_kernels.linalg.density_on_grid` (a bad
                ``sigma`` or ``n_grid``, an unsorted or non-finite ``grid``).
        """
        return density_on_grid(self.nodes, self.weights, grid=grid, sigma=sigma, n_grid=n_grid)

    def fraction_below(self, x, *, sigma: float | None = None) -> torch.Tensor:
        """Estimated fraction of eigenvalues ``<= x`` (a step function, or smoothed with
        ``sigma`` like :meth:`density`); multiply by :attr:`dim` for a count.

        Raises:
            TypeError: ``x`` is not real numbers. ValueError: ``x`` holds NaN, or a bad
                ``sigma``.
        """
        return cumulative_count(self.nodes, self.weights, x, sigma=sigma)

    def moment(self, order: int) -> float:
        """Estimate of ``tr(H^order) / dim``: the probes' mean of ``sum_j w_j theta_j^order``
        (exact in expectation over probes for ``order < 2 * steps``)."""
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"order must be a non-negative integer, got {order!r}")
        return float((self.weights * self.nodes.pow(order)).sum(1).mean())


def _operator(model, batch, loss_fn, curvature: str, engine: str, who: str):
    """The operator to solve with: ``model`` itself if it is one, else a new
    :class:`HessianOperator`."""
    if isinstance(model, nn.Module):
        if batch is None:
            raise ValueError(f"{who}: batch is required, a pair (inputs, targets)")
        # No per-product finiteness check: both solvers flag a non-finite product at the step
        # that meets it (with the step in the message), and the operator's own check is one
        # more pass over each product and a host read (~3 ms of an MLP k = 10 solve).
        return HessianOperator(
            model, loss_fn, batch, curvature=curvature, engine=engine, check_finite=False
        )
    if isinstance(model, HessianOperator) or (hasattr(model, "matmat") and hasattr(model, "dim")):
        if batch is not None:
            raise ValueError(
                f"{who}: model is already an operator ({type(model).__name__}) with its own "
                "batch; pass batch=None"
            )
        if loss_fn is not None:
            raise ValueError(f"{who}: loss_fn cannot be changed on a ready operator")
        have = getattr(model, "curvature", curvature)
        if curvature != "hessian" and curvature != have:
            raise ValueError(
                f"{who}: curvature={curvature!r} but the operator has curvature={have!r}"
            )
        if engine != "auto" and engine != getattr(model, "engine", engine):
            raise ValueError(f"{who}: engine={engine!r} but the operator uses {model.engine!r}")
        return model
    raise TypeError(
        f"{who}: model must be a torch.nn.Module or a HessianOperator, got {type(model).__name__}"
    )


_SOLVER_DTYPES = (torch.float32, torch.float64)


def _check_model_dtype(model, who: str) -> None:
    """TypeError for a model (or operator) whose dtype the solvers cannot take: their basis
    and products are float32 or float64, and a float16 model's products would be refused
    deep inside with a message about the vectors."""
    if isinstance(model, nn.Module):
        dtype = next((p.dtype for p in model.parameters() if p.requires_grad), None)
        what, fix = "the model's parameters are", "model.float()"
    else:
        dtype = getattr(model, "dtype", None)
        what, fix = "the operator's dtype is", "an operator built on model.float()"
    if dtype is not None and dtype not in _SOLVER_DTYPES:
        raise TypeError(f"{what} {dtype}; {who} needs float32 or float64 ({fix})")


def _replicated_seed(operator, seed: int) -> int:
    """The seed the solver draws from. A data-parallel operator
    (:class:`imc_kernels.distributed.DistributedHessianOperator`) runs the solver replicated on
    every rank and hands out rank 0's seed; the start block and probes are drawn from the seed
    on the CPU, so every rank starts from rank 0's block."""
    broadcast = getattr(operator, "broadcast_seed", None)
    return int(broadcast(seed)) if callable(broadcast) else seed


def _hvp_count(operator) -> int | None:
    count = getattr(operator, "n_products", None)
    return count if isinstance(count, int) else None


def top_eigvecs(
    model: nn.Module | HessianOperator,
    batch,
    k: int,
    *,
    loss_fn: Callable | None = None,
    which: str = "LA",
    tol: float = 1e-4,
    block_size: int | None = None,
    max_hvps: int | None = None,
    curvature: str = "hessian",
    engine: str = "auto",
    seed: int = 0,
    progress: bool = False,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of the loss Hessian (or GGN) of ``model`` on ``batch``.

    Thick-restart block Lanczos (:func:`imc_kernels.linalg.block_lanczos`) with full
    reorthogonalization over :class:`imc_kernels.HessianOperator` block products; float32
    products and basis for a float32 model, every projection and the projected problem in
    float64.

    Args:
        model: the network, or a ready :class:`HessianOperator` or
            :class:`imc_kernels.distributed.DistributedHessianOperator` (then ``batch`` is
            None and ``loss_fn``, ``curvature``, ``engine`` are the operator's; a distributed
            one runs the solver replicated on every rank from rank 0's ``seed``).
        batch: ``(inputs, targets)`` on the model's device.
        k: eigenpairs wanted, ``0 < k < dim``.
        loss_fn: ``loss_fn(output, targets) -> scalar``; None means cross-entropy for integer
            targets and MSE for float targets.
        which: ``"LA"`` largest algebraic (the top curvature), ``"SA"`` smallest algebraic,
            ``"LM"`` largest magnitude.
        tol: a pair converges when its Ritz residual is at most ``tol * ||H||_est``. 1e-4
            suits float32 models; a float64 model can go to ~1e-10.
        block_size: vectors per block product; default from
            :func:`imc_kernels.linalg.block_lanczos.default_block_size`. Use at least the
            multiplicity of any repeated eigenvalue among the wanted ones.
        max_hvps: cap on Hessian-vector products; pairs not converged by then come back with
            ``converged`` False.
        curvature: ``"hessian"`` or ``"ggn"``.
        engine: HVP engine, see :class:`HessianOperator`.
        seed: seed of the start block (drawn on the CPU): same seed, same device, same bits.
        progress: show a tqdm bar over Hessian-vector products.

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: ``k <= 0``, ``k >= dim``, an unknown ``which``, a bad ``tol``,
            ``block_size`` or ``max_hvps``, a missing batch, or settings that contradict a
            ready operator.
        TypeError: ``model`` is neither a module nor an operator; a model dtype other than
            float32 or float64 (float16, bfloat16); a ``seed`` that is not an int.
        FloatingPointError: a product was not finite.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
        >>> batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
        >>> res = top_eigvecs(model, batch, 3)
        >>> res.eigenvalues.shape, res.eigenvectors.shape, sorted(res.as_params(0))
        (torch.Size([3]), torch.Size([75, 3]), ['0.bias', '0.weight', '2.bias', '2.weight'])
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer smaller than the dimension, got {k!r}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    seed = check_seed(seed)
    _check_model_dtype(model, "top_eigvecs")
    operator = _operator(model, batch, loss_fn, curvature, engine, "top_eigvecs")
    dim = int(operator.dim)
    if k >= dim:
        raise ValueError(
            f"k = {k} must be smaller than the dimension {dim} (the number of trainable "
            "parameters); for the whole spectrum form the Hessian and use torch.linalg.eigh"
        )
    seed = _replicated_seed(operator, seed)
    before = _hvp_count(operator)
    res = block_lanczos(
        operator,
        dim,
        k,
        which=which,
        tol=tol,
        block_size=block_size,
        max_matvecs=max_hvps,
        seed=seed,
        progress="top_eigvecs" if progress else False,
    )
    after = _hvp_count(operator)
    n_hvps = after - before if before is not None and after is not None else res.n_matvecs
    return EigenResult(
        eigenvalues=res.eigenvalues,
        eigenvectors=res.eigenvectors,
        residuals=res.residuals,
        n_hvps=n_hvps,
        converged=res.converged,
        restarts=res.restarts,
        ritz_bounds=res.ritz_bounds,
        h_norm=res.h_norm,
        block_size=res.block_size,
        basis_size=res.basis_size,
        which=which,
        operator=operator,
    )


def spectral_density(
    model: nn.Module | HessianOperator,
    batch,
    *,
    n_probes: int = 8,
    steps: int = 64,
    loss_fn: Callable | None = None,
    curvature: str = "hessian",
    engine: str = "auto",
    seed: int = 0,
    probes: str = "rademacher",
    reorthogonalize: bool = False,
    progress: bool = False,
) -> SpectralDensity:
    """Spectral density of the loss Hessian (or GGN) by stochastic Lanczos quadrature.

    ``n_probes`` random probes run independent Lanczos recurrences, advanced together: each
    step is one block product of ``n_probes`` columns (not block Lanczos: the probes never
    mix). ``n_probes * steps`` Hessian-vector products in all.

    Args:
        model: the network, or a ready :class:`HessianOperator` or
            :class:`imc_kernels.distributed.DistributedHessianOperator` (then ``batch`` is
            None; a distributed one runs replicated from rank 0's ``seed``).
        batch: ``(inputs, targets)`` on the model's device.
        n_probes: independent probes; their spread shows the estimator's variance.
        steps: Lanczos steps per probe; the quadrature is exact for polynomials of degree
            below ``2 * steps``.
        loss_fn, curvature, engine: as for :func:`top_eigvecs`.
        seed: seed of the probes (drawn on the CPU).
        probes: ``"rademacher"`` or ``"gaussian"``.
        reorthogonalize: full reorthogonalization of each probe's Lanczos vectors (memory
            ``dim * n_probes * steps``); quadrature tolerates its absence, so off by default.
        progress: show a tqdm bar over the steps.

    Returns:
        A :class:`SpectralDensity`; ``.density()`` gives ``(grid, density, cdf)``.

    Raises:
        ValueError: non-positive ``n_probes`` or ``steps``, an unknown probe kind, a missing
            batch.
        TypeError: ``model`` is neither a module nor an operator; a model dtype other than
            float32 or float64 (float16, bfloat16); a ``seed`` that is not an int.
        FloatingPointError: a product was not finite.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
        >>> batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
        >>> dens = spectral_density(model, batch, n_probes=2, steps=10)
        >>> grid, density, cdf = dens.density()
        >>> dens.n_hvps, float(cdf[-1])
        (20, 1.0)
    """
    for name, value in (("n_probes", n_probes), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if probes not in PROBES:
        raise ValueError(f"probes must be one of {', '.join(PROBES)}, got {probes!r}")
    seed = check_seed(seed)
    _check_model_dtype(model, "spectral_density")
    operator = _operator(model, batch, loss_fn, curvature, engine, "spectral_density")
    dim = int(operator.dim)
    seed = _replicated_seed(operator, seed)
    before = _hvp_count(operator)
    res = slq(
        operator,
        dim,
        n_probes=n_probes,
        steps=steps,
        seed=seed,
        reorthogonalize=reorthogonalize,
        probes=probes,
        progress=progress,
    )
    after = _hvp_count(operator)
    n_hvps = after - before if before is not None and after is not None else res.n_matvecs
    return SpectralDensity(
        nodes=res.nodes, weights=res.weights, n_hvps=n_hvps, dim=dim, lengths=res.lengths
    )
