"""Stochastic Lanczos quadrature (SLQ) for the spectral density of a symmetric operator.

``n_probes`` independent single-vector Lanczos runs, one per random probe, advanced together:
each step applies the operator once to the ``(dim, n_probes)`` block of current vectors, and
each column then follows its own three-term recurrence and builds its own tridiagonal ``T_p``.
This is *not* block Lanczos (that would mix the probes); batching only shares the product.
The Gauss quadrature of probe ``p`` is ``(theta_pj, w_pj)``: the eigenvalues of ``T_p`` and
the squared first components of its eigenvectors, so that
``sum_j w_pj f(theta_pj) ~= q_p^T f(H) q_p`` (exact for polynomials of degree < 2 * steps),
whose mean over probes estimates ``tr f(H) / dim`` (``notes/kernel_design.md`` 3.6).

Lanczos quadrature tolerates the loss of orthogonality of the plain recurrence (Greenbaum;
Knizhnerman; discussed for SLQ by Chen, Trogdon and Ubaru, ICML 2021), so
``reorthogonalize=False`` is the default; ``True`` adds two Gram-Schmidt passes per step
against the probe's own basis (memory ``dim * n_probes * steps``), as a check.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imc_kernels.linalg.block_lanczos import _Operator, check_seed
from imc_kernels.linalg.orthogonalize import project_out, xty

PROBES = ("rademacher", "gaussian")


@dataclass
class SLQResult:
    """Quadrature nodes and weights of :func:`slq`.

    Attributes:
        nodes: ``(n_probes, steps)`` float64 (CPU): Ritz values of each probe's tridiagonal,
            ascending. A probe that broke down early (its Krylov space was invariant) has
            fewer; its row is padded by repeating the last node, with weight 0.
        weights: ``(n_probes, steps)`` float64 (CPU); each row sums to 1.
        n_matvecs: operator applications (every column of every block product).
        lengths: ``(n_probes,)`` int64, each probe's tridiagonal size.
        alphas: ``(n_probes, steps)`` float64, the recurrence's diagonals (0 past the length).
        betas: ``(n_probes, steps)`` float64, ``betas[p, j]`` the coupling of steps ``j`` and
            ``j + 1`` (0 past the length).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    n_matvecs: int
    lengths: torch.Tensor
    alphas: torch.Tensor
    betas: torch.Tensor


def _probe_block(dim: int, n_probes: int, kind: str, generator, dtype) -> torch.Tensor:
    if kind == "rademacher":
        signs = torch.randint(0, 2, (dim, n_probes), generator=generator, dtype=torch.int8)
        return (2 * signs - 1).to(dtype)
    return torch.randn(dim, n_probes, generator=generator, dtype=dtype)


def slq(
    matmat: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | Any,
    dim: int,
    *,
    n_probes: int = 8,
    steps: int = 64,
    seed: int = 0,
    reorthogonalize: bool = False,
    probes: str = "rademacher",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> SLQResult:
    """Stochastic Lanczos quadrature: ``n_probes`` Lanczos runs sharing each block product.

    Args:
        matmat: the symmetric operator, as for
            :func:`~imc_kernels.linalg.block_lanczos.block_lanczos` (callable on
            ``(dim, b)`` blocks, dense or sparse tensor, ``.matmat`` or ``@``).
        dim: the operator's dimension.
        n_probes: independent probes (columns of each block product).
        steps: Lanczos steps per probe (at most ``dim`` are run; the rest is padding).
        seed: seed of the probes (drawn on the CPU, then moved: reproducible).
        reorthogonalize: full reorthogonalization (two passes) of each probe's vectors
            against its own basis.
        probes: ``"rademacher"`` (entries +-1) or ``"gaussian"``; normalized to unit norm.
        dtype: float32 or float64; default as in ``block_lanczos`` (the matrix's dtype for
            a tensor operator, else float32). Coefficients are accumulated in float64.
        device: default the operator's device, else CPU.
        progress: tqdm bar over the steps.

    Returns:
        An :class:`SLQResult`.

    Raises:
        ValueError: non-positive ``n_probes`` or ``steps``, an unknown probe kind.
        TypeError: an unsupported operator or dtype (a matrix that is not floating point),
            a seed that is not an int.
        FloatingPointError: the operator produced NaN or inf (the message names the step).

    Example:
        >>> A = torch.diag(torch.linspace(0, 1, 200, dtype=torch.float64))
        >>> res = slq(A, 200, n_probes=4, steps=20)
        >>> torch.allclose(res.weights.sum(1), torch.ones(4, dtype=torch.float64))
        True
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if probes not in PROBES:
        raise ValueError(f"probes must be one of {', '.join(PROBES)}, got {probes!r}")
    seed = check_seed(seed)
    op = _Operator(matmat, dim, dtype, device)
    dtype, device = op.dtype, op.device
    n_steps = min(steps, dim)
    generator = torch.Generator().manual_seed(seed)
    start = _probe_block(dim, n_probes, probes, generator, dtype).to(device)
    start_norm = torch.linalg.vector_norm(start, dim=0, dtype=torch.float64)
    current = start / start_norm.to(dtype)
    previous = torch.zeros_like(current)
    beta = torch.zeros(n_probes, dtype=torch.float64, device=device)
    active = torch.ones(n_probes, dtype=torch.bool, device=device)
    alphas = torch.zeros(n_steps, n_probes, dtype=torch.float64, device=device)
    betas = torch.zeros(n_steps, n_probes, dtype=torch.float64, device=device)
    was_active = torch.zeros(n_steps, n_probes, dtype=torch.bool, device=device)
    non_finite = torch.zeros(n_steps, dtype=torch.bool, device=device)
    h_scale = torch.zeros((), dtype=torch.float64, device=device)
    # A probe stops when beta_{j+1} <= 100 eps ||H||_est: its Krylov space is invariant to
    # working precision (beta is rounding noise, u * ||H|| to u * sqrt(j) * ||H||).
    breakdown = 100.0 * torch.finfo(dtype).eps
    basis = None
    if reorthogonalize:
        basis = torch.empty(n_probes, dim, n_steps, dtype=dtype, device=device)
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=n_steps, unit="step", desc="SLQ")
    n_matvecs = 0
    try:
        for j in range(n_steps):
            was_active[j] = active
            if basis is not None:
                basis[:, :, j] = current.T
            product = op(current)
            if product.data_ptr() == current.data_ptr():
                product = product.clone()
            n_matvecs += n_probes
            product -= previous * beta.to(dtype)
            # Column dot products with fp64 accumulation: the diagonal of one small Gram.
            alpha = xty(current, product).diagonal().clone()
            product -= current * alpha.to(dtype)
            if basis is not None:
                for p in range(n_probes):
                    own = basis[p, :, : j + 1]
                    column = product[:, p : p + 1]
                    first = project_out(own, column)
                    project_out(own, column)
                    alpha[p] += first[j, 0]  # fold the diagonal correction into alpha
            beta_next = xty(product, product).diagonal().clamp_min(0).sqrt()
            non_finite[j] = ~(torch.isfinite(alpha).all() & torch.isfinite(beta_next).all())
            h_scale = torch.maximum(h_scale, (alpha.abs() + beta + beta_next).max())
            alphas[j] = torch.where(active, alpha, 0.0)
            betas[j] = torch.where(active, beta_next, 0.0)
            active = active & (beta_next > breakdown * h_scale)
            previous = current
            current = torch.where(active, product / beta_next.to(dtype), 0.0)
            beta = torch.where(active, beta_next, 0.0)
            if pbar is not None:
                pbar.update(1)
    finally:
        if pbar is not None:
            pbar.close()
    bad = non_finite.cpu()
    if bool(bad.any()):
        step = int(bad.to(torch.int8).argmax())
        raise FloatingPointError(
            f"SLQ: the operator returned a non-finite value (NaN or inf) at Lanczos step {step}"
        )
    lengths = was_active.sum(0).cpu()
    alphas_host, betas_host = alphas.cpu().T.contiguous(), betas.cpu().T.contiguous()
    nodes = torch.zeros(n_probes, steps, dtype=torch.float64)
    weights = torch.zeros(n_probes, steps, dtype=torch.float64)
    for p in range(n_probes):
        size = int(lengths[p])
        tri = torch.diag(alphas_host[p, :size])
        if size > 1:
            off = betas_host[p, : size - 1]
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        theta, vectors = torch.linalg.eigh(tri)
        nodes[p, :size] = theta
        nodes[p, size:] = theta[-1]
        weights[p, :size] = vectors[0].square()
    alphas_out = torch.zeros(n_probes, steps, dtype=torch.float64)
    betas_out = torch.zeros(n_probes, steps, dtype=torch.float64)
    alphas_out[:, :n_steps] = alphas_host
    betas_out[:, :n_steps] = betas_host
    return SLQResult(nodes, weights, n_matvecs, lengths.to(torch.int64), alphas_out, betas_out)


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(
        device="cpu", dtype=torch.float64
    )


def _real_values(values, name: str) -> torch.Tensor:
    """``values`` (a number, sequence, array or tensor of real numbers) as float64 on the
    CPU.

    Raises:
        TypeError: anything else (strings, complex numbers, objects).
        ValueError: a NaN.
    """
    given = values
    if isinstance(values, torch.Tensor):
        ok = not values.is_complex() and values.dtype != torch.bool
    else:
        try:
            values = np.asarray(values)
        except (TypeError, ValueError) as exc:  # ragged sequences
            raise TypeError(f"{name} must be a real number or an array of them: {exc}") from exc
        ok = values.dtype.kind in "iuf"
    if not ok:
        shown = repr(given) if len(repr(given)) <= 80 else f"a {type(given).__name__}"
        raise TypeError(
            f"{name} must be a real number or an array of real numbers, got {shown}"
            f" of dtype {values.dtype}"
        )
    values = _as_float64(values)
    if bool(values.isnan().any()):
        raise ValueError(f"{name} must not hold NaN")
    return values


def _check_sigma(sigma) -> float:
    """``sigma`` as a float.

    Raises:
        TypeError: not a real number. ValueError: not positive and finite (an infinite
            width makes every density value 0/inf, NaN).
    """
    if isinstance(sigma, torch.Tensor) and sigma.numel() == 1 and not sigma.is_complex():
        sigma = sigma.item()
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a positive real number, got {sigma!r}")
    sigma = float(sigma)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    return sigma


def default_sigma(nodes: torch.Tensor, weights: torch.Tensor) -> float:
    """Gaussian width: 1 % of the range of the weighted nodes (a 1e-3 floor if it is empty).

    With the default 1000-point grid spanning the range plus 5 sigma on each side, one sigma
    is about 9 grid points: the smoothing is resolved, and features 1 % of the spectrum
    apart stay distinguishable.
    """
    nodes, weights = _as_float64(nodes), _as_float64(weights)
    used = nodes[weights > 0]
    if used.numel() == 0:
        return 1e-3
    span = float(used.max() - used.min())
    scale = max(span, 1e-3 * max(float(used.abs().max()), 1.0))
    return 0.01 * scale


def density_on_grid(
    nodes,
    weights,
    grid=None,
    sigma: float | None = None,
    n_grid: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian-smoothed spectral density from SLQ nodes and weights (PyHessian style).

    ``density(x) = mean_p sum_j w_pj N(x; theta_pj, sigma^2)``: each node a Gaussian of width
    ``sigma``, weights averaged over probes, so the density integrates to 1 over the line.

    Args:
        nodes: ``(n_probes, steps)`` (or ``(steps,)``) quadrature nodes.
        weights: same shape, rows summing to 1.
        grid: points to evaluate at; default ``n_grid`` points over the node range widened by
            ``5 sigma`` on each side (so the mass on the grid is 1 to ~1e-6).
        sigma: Gaussian width; default :func:`default_sigma` (1 % of the range).
        n_grid: grid size when ``grid`` is None.

    Returns:
        ``(grid, density, cdf)`` float64: the cdf is the cumulative trapezoid of the density,
        normalized to end at 1.

    Raises:
        ValueError: ``sigma`` not a positive finite number, ``n_grid`` below 2, or a
            ``grid`` that is empty, holds NaN or inf, or is not sorted ascending (the cdf
            integrates along it).
        TypeError: a ``grid`` or ``sigma`` that is not real numbers.

    Example:
        >>> nodes, weights = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]])
        >>> grid, dens, cdf = density_on_grid(nodes, weights)
        >>> round(float(torch.trapezoid(dens, grid)), 4), float(cdf[-1])
        (1.0, 1.0)
    """
    nodes, weights = _as_float64(nodes), _as_float64(weights)
    if nodes.dim() == 1:
        nodes, weights = nodes[None], weights[None]
    if nodes.shape != weights.shape:
        raise ValueError(f"nodes {tuple(nodes.shape)} and weights {tuple(weights.shape)} differ")
    sigma = default_sigma(nodes, weights) if sigma is None else _check_sigma(sigma)
    if grid is None:
        if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 2:
            raise ValueError(f"n_grid must be an integer >= 2, got {n_grid!r}")
        used = nodes[weights > 0]
        lo, hi = (float(used.min()), float(used.max())) if used.numel() else (0.0, 0.0)
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid, dtype=torch.float64)
    else:
        grid = _real_values(grid, "grid").flatten()
        if grid.numel() == 0:
            raise ValueError("grid is empty; give at least one point (or grid=None)")
        if not bool(torch.isfinite(grid).all()):
            raise ValueError("grid must hold finite points, got inf")
        if bool((grid.diff() < 0).any()):
            raise ValueError(
                "grid must be sorted ascending (the cdf integrates along it); sort it first, "
                "e.g. torch.sort(grid).values"
            )
    flat_nodes = nodes.flatten()
    flat_weights = weights.flatten() / nodes.shape[0]
    density = torch.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    chunk = max(1, 2**22 // max(flat_nodes.numel(), 1))  # bounds the grid x nodes temporary
    for i in range(0, grid.numel(), chunk):
        z = (grid[i : i + chunk, None] - flat_nodes[None, :]) / sigma
        density[i : i + chunk] = norm * (torch.exp(-0.5 * z.square()) @ flat_weights)
    if grid.numel() > 1:
        steps = 0.5 * (density[1:] + density[:-1]) * grid.diff()
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0)])
    else:
        cdf = torch.zeros_like(grid)
    total = float(cdf[-1])
    cdf = cdf / total if total > 0 else cdf
    return grid, density, cdf


def cumulative_count(
    nodes,
    weights,
    x,
    *,
    dim: int | None = None,
    sigma: float | None = None,
) -> torch.Tensor:
    """Estimated fraction (or count) of eigenvalues at most ``x``, from SLQ quadrature.

    ``F(x) = mean_p sum_j w_pj [theta_pj <= x]``, or with ``sigma`` the Gaussian-smoothed
    ``mean_p sum_j w_pj Phi((x - theta_pj) / sigma)`` matching :func:`density_on_grid`.

    Args:
        nodes, weights: as returned by :func:`slq`.
        x: scalar or tensor of thresholds.
        dim: if given, return counts ``dim * F(x)`` instead of fractions.
        sigma: smoothing width; None (default) for the step function.

    Returns:
        float64 tensor shaped like ``x``.

    Raises:
        TypeError: ``x`` or ``sigma`` is not real numbers.
        ValueError: ``x`` holds NaN, or ``sigma`` is not a positive finite number.
    """
    nodes, weights = _as_float64(nodes), _as_float64(weights)
    if nodes.dim() == 1:
        nodes, weights = nodes[None], weights[None]
    x = _real_values(x, "x")
    if sigma is not None:
        sigma = _check_sigma(sigma)
    flat_nodes = nodes.flatten()
    flat_weights = weights.flatten() / nodes.shape[0]
    diff = x.reshape(-1, 1) - flat_nodes[None, :]
    if sigma is None:
        below = (diff >= 0).to(torch.float64)
    else:
        below = 0.5 * (1.0 + torch.erf(diff / (sigma * math.sqrt(2.0))))
    fraction = (below @ flat_weights).reshape(x.shape)
    return fraction * dim if dim is not None else fraction
