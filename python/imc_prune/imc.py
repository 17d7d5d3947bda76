"""IMC: one-shot pruning from the loss Hessian's spectral gap (DESIGN section 5).

Zhang et al., "Validating the Lottery Ticket Hypothesis with Inertial Manifold Theory"
(NeurIPS 2021). Around the weights ``W*`` reached by a short warm-up, gradient flow in
``U = W - W*`` reads ``dU/dt = -A U + F(U)`` with ``A = Hess L(W*)`` and the nonlinear remainder
``F(U) = A U - grad L(W* + U)``. When the spectrum of ``A`` has a gap wider than ``c`` times the
Lipschitz constant of ``F``, the modes above the gap are slaved to an inertial manifold of
dimension ``n`` (the modes below it): the network needs about ``n`` of its ``d`` weights and
the prune rate is ``1 - n / d = 1 - Phi(gap)``, with ``Phi`` the spectrum's cumulative
distribution.

Each step is a function that can be called and tested alone:

1. :func:`warmup`: ``warmup_steps`` SGD iterations from ``W0`` give ``W*``.
2. :func:`spectrum`: the SLQ spectral density and the top eigenpairs of ``A`` (block Lanczos).
3. :func:`lipschitz`: ``L = sup ||A - Hess L(W* + U)||_2`` over ``||U||_p <= eps``, by
   Lanczos on Hessian-vector-product differences at a few random ``U``.
4. :func:`spectral_gap`: the smallest ``n >= #{lambda <= 0}`` with
   ``lambda_{n+1} - lambda_n > c L``, and the prune rate.
5. :func:`scores`: ``magnitude``, ``leverage`` or ``curvature``.
6. :func:`imc_prune.masks.masks_from_scores`: global or layer-wise masks, of single weights,
   ``block_size`` tiles or 2:4 groups (``granularity``).
7. :func:`rewind`: survivors back to ``W0`` (default) or kept at ``W*``.

:func:`imc` runs them in order and returns an :class:`IMCResult` that carries everything that
explains the decision.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import numbers
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

import imc_kernels
from imc_kernels.hvp._common import CURVATURES, ENGINES, resolve_loss
from imc_kernels.linalg import block_lanczos
from imc_prune._checks import (
    check_class_targets,
    check_positive_int,
    check_positive_real,
    check_seed,
    forward,
    training_set,
)
from imc_prune.data import DatasetSplits, first_batch, iterate_batches
from imc_prune.masks import (
    SCOPES,
    apply_masks,
    check_granularity,
    check_masks,
    masks_from_scores,
    prunable_parameters,
    sparsity_report,
)

SCORES = ("magnitude", "leverage", "curvature")
REWINDS = ("init", "warmup")

# The warm-up has diverged when its loss grows past this factor of its first value (of 1 when
# the first is below 1: a loss near zero may rise by orders of magnitude without diverging).
# Plain SGD at a sane lr stays within a few times its first loss; lr=1e6 on digits reaches
# 3.6e10 times it at the second iteration.
DIVERGENCE_FACTOR = 1e3

# Upper bound on the points of the grid the smoothed cumulative distribution is evaluated on
# (memory and time are linear in it: 2**20 points x 512 quadrature nodes is about 2 s on CPU).
_MAX_GRID = 1 << 20


# --------------------------------------------------------------------------------------------
# Step 1: warm-up


@dataclasses.dataclass
class Warmup:
    """The two weight states IMC works between.

    Attributes:
        initial: ``W0``, a ``state_dict`` copy (the rewind point).
        trained: ``W*``, a ``state_dict`` copy after the warm-up.
        steps: SGD iterations taken.
        losses: the training loss at each iteration.
        lr: the SGD learning rate.
        batch_size: training batch size.
    """

    initial: dict[str, torch.Tensor]
    trained: dict[str, torch.Tensor]
    steps: int
    losses: list[float]
    lr: float
    batch_size: int


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    raise ValueError("the model has no parameters")


def warmup(
    model: nn.Module,
    train_set,
    *,
    steps: int = 10,
    lr: float = 0.1,
    momentum: float = 0.0,
    batch_size: int = 128,
    loss_fn: Callable | None = None,
    seed: int = 0,
) -> Warmup:
    """Step 1: ``steps`` plain SGD iterations from the model's current weights ``W0``.

    The model is trained in place (train mode, then left in eval mode) and ends at ``W*``.
    The first batch is checked against the model: a forward that fails says which input
    shape or dtype the data has, and class indices outside the model's outputs are named.
    The warm-up stops with an error when it diverges: a loss that is not finite, or one above
    :data:`DIVERGENCE_FACTOR` (1000) times ``max(first loss, 1)``.

    Args:
        model: the network at ``W0``.
        train_set: a map-style ``torch.utils.data.Dataset`` of ``(input, target)`` pairs (a
            :class:`imc_prune.data.DatasetSplits` stands for its ``train`` split).
        steps: SGD iterations (0 keeps ``W* = W0``).
        lr: learning rate.
        momentum: SGD momentum.
        batch_size: samples per iteration.
        loss_fn: ``loss_fn(output, target) -> scalar``; None: cross-entropy for integer
            targets, MSE for float targets (the rule of :class:`imc_kernels.HessianOperator`),
            picked from the first batch.
        seed: seed of the batch order.

    Returns:
        A :class:`Warmup` with copies of ``W0`` and ``W*``.

    Raises:
        TypeError: ``train_set`` is not a map-style dataset; a ``seed`` that is not an int;
            inputs whose dtype the model's parameters do not have.
        ValueError: negative ``steps``, non-positive ``lr`` or ``batch_size``, an empty
            training set, samples the model cannot take, class indices outside its outputs.
        FloatingPointError: the loss became non-finite or diverged (lower ``lr``).

    Example:
        >>> w = warmup(model, splits.train, steps=10)
        >>> len(w.losses)
        10
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"warm-up steps must be a non-negative integer, got {steps!r}")
    if (
        isinstance(lr, bool)
        or not isinstance(lr, numbers.Real)
        or not (lr > 0 and math.isfinite(lr))
    ):
        raise ValueError(f"warm-up lr must be positive, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"warm-up batch_size must be a positive integer, got {batch_size!r}")
    train_set = training_set(train_set)
    seed = check_seed(seed)
    if steps and len(train_set) == 0:
        raise ValueError("the training set is empty: the warm-up needs samples to train on")
    device = _model_device(model)
    initial = _state_copy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    while len(losses) < steps:
        for inputs, targets in iterate_batches(
            train_set, batch_size, shuffle=True, generator=generator
        ):
            if len(losses) == steps:
                break
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            if losses:
                output = model(inputs)
            else:
                loss_fn = resolve_loss(loss_fn, targets)
                output = forward(model, inputs)
                check_class_targets(output, targets, loss_fn)
            loss = loss_fn(output, targets)
            value = float(loss.detach())
            _check_warmup_loss(value, losses, lr)
            loss.backward()
            optimizer.step()
            losses.append(value)
    model.eval()
    return Warmup(initial, _state_copy(model), steps, losses, lr, batch_size)


def _check_warmup_loss(value: float, losses: list[float], lr: float) -> None:
    """Stop a warm-up whose loss is not finite or has grown past the divergence rule."""
    iteration = len(losses) + 1
    if not math.isfinite(value):
        raise FloatingPointError(
            f"warm-up: the loss is {value} at iteration {iteration}; lower the warm-up lr "
            f"(now {lr})"
        )
    if losses and value > DIVERGENCE_FACTOR * max(losses[0], 1.0):
        raise FloatingPointError(
            f"warm-up diverged: the loss rose from {losses[0]:.4g} to {value:.4g} at iteration "
            f"{iteration}, more than {DIVERGENCE_FACTOR:g} times max(first loss, 1); lower the "
            f"warm-up lr (now {lr})"
        )


# --------------------------------------------------------------------------------------------
# Step 2: spectrum


@dataclasses.dataclass
class Spectrum:
    """The spectrum of ``A = Hess L(W*)``: SLQ density plus exact top eigenpairs.

    Attributes:
        density: the :class:`imc_kernels.spectral.SpectralDensity` (nodes, weights per probe).
        top: the :class:`imc_kernels.spectral.EigenResult` of the top ``k`` eigenpairs.
        dim: ``d``, the number of trainable parameters.
        sigma: the Gaussian width used to smooth the density.
        n_hvps: Hessian-vector products spent on both.
        seconds: wall time of both.
    """

    density: Any
    top: Any
    dim: int
    sigma: float
    n_hvps: int
    seconds: float

    @property
    def top_eigenvalues(self) -> torch.Tensor:
        """``(k,)`` float64, descending."""
        return self.top.eigenvalues.detach().cpu()

    def curve(self, n_grid: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(grid, density, cdf)`` of the smoothed density, numpy float64, for plots."""
        grid, dens, cdf = self.density.density(sigma=self.sigma, n_grid=n_grid)
        return grid.numpy(), dens.numpy(), cdf.numpy()

    def cdf(self, x) -> np.ndarray:
        """Smoothed fraction of eigenvalues ``<= x`` (the ``Phi`` of the prune-rate rule)."""
        return self.density.fraction_below(torch.as_tensor(x), sigma=self.sigma).numpy()


def _default_sigma(density, top_eigenvalues: torch.Tensor) -> float:
    """PyHessian's smoothing: a width proportional to the spectrum's range (1e-2 of it, the
    default of :func:`imc_kernels.linalg.slq.density_on_grid`), the range taken from the
    quadrature nodes and the exact top eigenvalue together."""
    lo = float(density.nodes.min())
    hi = max(float(density.nodes.max()), float(top_eigenvalues.max()))
    return max(hi - lo, 1e-12) * 1e-2


def spectrum(
    model: nn.Module,
    batch,
    *,
    k: int = 32,
    n_probes: int = 8,
    steps: int = 64,
    tol: float = 1e-4,
    loss_fn: Callable | None = None,
    curvature: str = "hessian",
    engine: str = "auto",
    sigma: float | None = None,
    seed: int = 0,
    progress: bool = False,
    operator: Callable | None = None,
) -> Spectrum:
    """Step 2: spectral density (SLQ) and top-``k`` eigenpairs of the loss Hessian at ``W*``.

    Both run on one :class:`imc_kernels.HessianOperator` (eval mode), so its primal forward
    and backward are computed once.

    Args:
        model: the network at ``W*``.
        batch: ``(inputs, targets)`` on the model's device: the Hessian's batch.
        k: top eigenpairs (block Lanczos, ``which="LA"``) that resolve the outliers exactly.
        n_probes, steps: SLQ probes and Lanczos steps per probe.
        tol: eigenpair tolerance (relative to ``||A||``).
        loss_fn: as in :class:`imc_kernels.HessianOperator`.
        curvature: ``"hessian"`` or ``"ggn"``.
        engine: HVP engine.
        sigma: smoothing width of the density; default 1 % of the spectrum's range.
        seed: seed of the probes and of the Lanczos start block.
        progress: tqdm bars.
        operator: the operator's constructor, called as ``operator(model, loss_fn, batch,
            curvature=..., engine=...)``; default :class:`imc_kernels.HessianOperator`. For a
            batch sharded over ``torch.distributed`` ranks:
            ``functools.partial(imc_kernels.distributed.DistributedHessianOperator,
            full_batch=True)``.

    Returns:
        A :class:`Spectrum`.

    Raises:
        TypeError, ValueError: ``k`` is not a positive int, ``seed`` not an int; a
            non-positive ``sigma``; the operator's errors.

    Example:
        >>> spec = spectrum(model, batch, k=8)
        >>> spec.top_eigenvalues[:3]
    """
    k = check_positive_int(k, "k")
    seed = check_seed(seed)
    started = time.perf_counter()
    make = imc_kernels.HessianOperator if operator is None else operator
    operator = make(model, loss_fn, batch, curvature=curvature, engine=engine)
    if k >= int(operator.dim):
        warnings.warn(
            f"k = {k} top eigenpairs asked of a Hessian of dimension {operator.dim}; using "
            f"k = {operator.dim - 1}",
            stacklevel=2,
        )
        k = int(operator.dim) - 1
    density = imc_kernels.spectral_density(
        operator, None, n_probes=n_probes, steps=steps, seed=seed, progress=progress
    )
    top = imc_kernels.top_eigvecs(operator, None, k, tol=tol, seed=seed, progress=progress)
    if sigma is None:
        sigma = _default_sigma(density, top.eigenvalues.cpu())
    elif not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    return Spectrum(
        density=density,
        top=top,
        dim=int(operator.dim),
        sigma=float(sigma),
        n_hvps=int(density.n_hvps) + int(top.n_hvps),
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------
# Step 3: Lipschitz constant of the nonlinear remainder


@dataclasses.dataclass
class Lipschitz:
    """Estimate of ``Lip(F) = sup ||A - Hess L(W* + U)||_2`` over ``||U||_p <= eps``.

    A maximum over sampled directions, so a lower bound of the supremum in principle; the
    spread over directions shows how tight it is.

    Attributes:
        value: the estimate, the largest of ``per_direction``.
        per_direction: ``||A - Hess L(W* + U_j)||_2`` for each sampled ``U_j``.
        eps: the ball's radius.
        p: the ball's norm.
        n_hvps: Hessian-vector products spent (both operators counted).
        seconds: wall time.
    """

    value: float
    per_direction: list[float]
    eps: float
    p: float
    n_hvps: int
    seconds: float


def _flat_trainable(model: nn.Module) -> list[nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def lipschitz(
    model: nn.Module,
    batch,
    *,
    eps: float = 0.01,
    p: float = 2.0,
    n_directions: int = 3,
    tol: float = 1e-2,
    max_hvps: int = 200,
    loss_fn: Callable | None = None,
    curvature: str = "hessian",
    engine: str = "auto",
    seed: int = 0,
    progress: bool = False,
    operator: Callable | None = None,
) -> Lipschitz:
    """Step 3: the Lipschitz constant of ``F(U) = A U - grad L(W* + U)`` on the ``l_p`` ball.

    ``DF(U) = A - Hess L(W* + U)``, so ``Lip(F) = sup_U ||A - Hess L(W* + U)||_2``. For each of
    ``n_directions`` random ``U`` on the sphere ``||U||_p = eps`` (the supremum of a norm of a
    difference that grows with ``||U||`` sits on the boundary), the spectral norm of the
    symmetric difference operator is the largest-magnitude eigenvalue, found by block Lanczos
    (``which="LM"``) on differences of Hessian-vector products at ``W*`` and ``W* + U``.

    Args:
        model: the network at ``W*`` (not modified).
        batch: the Hessian's batch.
        eps: radius of the ball.
        p: norm of the ball (``p >= 1``, ``math.inf`` allowed).
        n_directions: random ``U`` sampled.
        tol: relative tolerance of each norm (1e-2: the gap test compares it with a spacing,
            two digits decide it).
        max_hvps: cap per direction on products of the difference operator.
        loss_fn, curvature, engine: as for :func:`spectrum`.
        seed: seed of the directions and of the Lanczos start blocks.
        progress: tqdm bars.
        operator: the operator's constructor, as for :func:`spectrum`.

    Returns:
        A :class:`Lipschitz`.

    Raises:
        ValueError: ``eps <= 0``, ``p < 1``, ``n_directions < 1``.
        TypeError: a ``seed`` that is not an int.

    Example:
        >>> lip = lipschitz(model, batch, eps=0.01)
        >>> lip.value > 0
        True
    """
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite radius, got {eps!r}")
    if not p >= 1:
        raise ValueError(f"p must be at least 1 (an l_p norm), got {p!r}")
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions must be a positive integer, got {n_directions!r}")
    seed = check_seed(seed)
    started = time.perf_counter()
    make = imc_kernels.HessianOperator if operator is None else operator
    center = make(model, loss_fn, batch, curvature=curvature, engine=engine)
    dim = int(center.dim)
    generator = torch.Generator().manual_seed(seed)
    values: list[float] = []
    n_hvps = 0
    for direction in range(n_directions):
        shift = torch.randn(dim, generator=generator, dtype=torch.float64)
        shift *= eps / float(torch.linalg.vector_norm(shift, ord=p))
        shifted_model = copy.deepcopy(model)
        params = _flat_trainable(shifted_model)
        with torch.no_grad():
            offset = 0
            for param in params:
                count = param.numel()
                param.add_(shift[offset : offset + count].view_as(param).to(param))
                offset += count
        shifted = make(shifted_model, loss_fn, batch, curvature=curvature, engine=engine)

        def difference(block, center=center, shifted=shifted):
            return center.matmat(block) - shifted.matmat(block)

        first = next(iter(params))
        res = block_lanczos(
            difference,
            dim,
            1,
            which="LM",
            tol=tol,
            max_matvecs=max_hvps,
            seed=seed + direction,
            dtype=first.dtype,
            device=first.device,
            progress="lipschitz" if progress else False,
        )
        values.append(abs(float(res.eigenvalues[0])))
        n_hvps += 2 * res.n_matvecs
    return Lipschitz(
        value=max(values),
        per_direction=values,
        eps=float(eps),
        p=float(p),
        n_hvps=n_hvps,
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------
# Step 4: spectral gap and prune rate


@dataclasses.dataclass
class Gap:
    """The spectral gap that satisfies the inertial-manifold condition.

    Eigenvalues are indexed ascending, ``lambda_1 <= ... <= lambda_d``.

    Attributes:
        n: modes at or below the gap: the inertial manifold's dimension, the weights kept.
        lower: ``lambda_n``, the gap's lower edge.
        upper: ``lambda_{n+1}``, its upper edge.
        width: ``upper - lower``.
        threshold: ``c * L``, the width the condition asks for.
        c: the constant.
        n_nonpositive: ``#{lambda <= 0}``, where the search starts.
        dim: ``d``.
        prune_rate: ``1 - n / d = 1 - Phi(gap)``.
        source: ``"density"`` (the gap lies in the smoothed bulk), ``"bulk-edge"`` (between the
            bulk and the lowest exact eigenvalue) or ``"eigenvalues"`` (between exact
            eigenvalues), or ``"none"`` (no gap wide enough: nothing is pruned).
        resolution: grid spacing of the density's quantiles (gaps are exact to about this).
    """

    n: int
    lower: float
    upper: float
    width: float
    threshold: float
    c: float
    n_nonpositive: int
    dim: int
    prune_rate: float
    source: str
    resolution: float


def _cdf_on_grid(spec: Spectrum, lo: float, hi: float, points: int) -> tuple:
    grid = torch.linspace(lo, hi, points, dtype=torch.float64)
    chunks = [spec.density.fraction_below(part, sigma=spec.sigma) for part in grid.split(1 << 15)]
    cdf = torch.cat(chunks).numpy()
    return grid.numpy(), np.maximum.accumulate(cdf)


def spectral_gap(spec: Spectrum, lipschitz_constant: float, *, c: float = 4.0) -> Gap:
    """Step 4: the smallest ``n >= #{lambda <= 0}`` with ``lambda_{n+1} - lambda_n > c L``.

    The ascending eigenvalue sequence is read from the spectrum: the bulk from the quantiles
    of the smoothed SLQ distribution, ``lambda_n = Phi^{-1}((n - 1/2) / d)``, the top ``k``
    from the exact Lanczos eigenvalues (the density cannot place isolated outliers). The prune
    rate is the fraction above the gap, ``1 - n / d``.

    Args:
        spec: the :class:`Spectrum` at ``W*``.
        lipschitz_constant: ``L``, from :func:`lipschitz`.
        c: the constant of the gap condition: 4 by default, 2 is the sharp constant.

    Returns:
        A :class:`Gap`; when no gap is wide enough, ``n = d`` and ``prune_rate = 0``
        (``source="none"``).

    Raises:
        ValueError: a negative or non-finite ``lipschitz_constant``, ``c <= 0``.

    Example:
        >>> gap = spectral_gap(spec, lip.value, c=4.0)
        >>> gap.prune_rate
    """
    if not (math.isfinite(lipschitz_constant) and lipschitz_constant >= 0):
        raise ValueError(f"lipschitz_constant must be finite and >= 0, got {lipschitz_constant}")
    if not c > 0:
        raise ValueError(f"c must be positive, got {c!r}")
    dim = spec.dim
    top = np.sort(spec.top_eigenvalues.numpy())  # ascending, the exact lambda_{d-k+1..d}
    k = top.size
    threshold = c * lipschitz_constant
    nodes = spec.density.nodes
    lo = float(nodes.min()) - 5 * spec.sigma
    hi = max(float(nodes.max()), float(top[-1])) + 5 * spec.sigma
    # Grid fine enough that a gap of width `threshold` spans several points.
    points = int(min(_MAX_GRID, max(1 << 14, math.ceil(4 * (hi - lo) / max(threshold, 1e-300)))))
    grid, cdf = _cdf_on_grid(spec, lo, hi, points)
    resolution = (hi - lo) / (points - 1)
    n_nonpositive = int(round(dim * float(np.interp(0.0, grid, cdf))))
    n_nonpositive = min(n_nonpositive, dim - k)

    def found(n: int, lower: float, upper: float, source: str) -> Gap:
        return Gap(
            n=n,
            lower=float(lower),
            upper=float(upper),
            width=float(upper - lower),
            threshold=threshold,
            c=float(c),
            n_nonpositive=n_nonpositive,
            dim=dim,
            prune_rate=1.0 - n / dim,
            source=source,
            resolution=resolution,
        )

    # Bulk: lambda_n for n = n_nonpositive .. d - k (1-based), quantiles of the smoothed cdf.
    first, last = max(n_nonpositive, 1), dim - k
    if last >= first:
        levels = (np.arange(first, last + 1, dtype=np.float64) - 0.5) / dim
        bulk = grid[np.minimum(np.searchsorted(cdf, levels, side="left"), grid.size - 1)]
        widths = np.diff(bulk)
        hits = np.flatnonzero(widths > threshold)
        if hits.size:
            i = int(hits[0])
            return found(first + i, bulk[i], bulk[i + 1], "density")
        # Between the bulk's top and the lowest exact eigenvalue.
        if top[0] - bulk[-1] > threshold:
            return found(last, bulk[-1], top[0], "bulk-edge")
    # Among the exact top eigenvalues: lambda_{d-k+j} = top[j - 1].
    widths = np.diff(top)
    for j in range(widths.size):
        n = dim - k + j + 1
        if n >= n_nonpositive and top[j] > 0 and widths[j] > threshold:
            return found(n, top[j], top[j + 1], "eigenvalues")
    return Gap(
        n=dim,
        lower=float(top[-1]),
        upper=float("inf"),
        width=float("inf"),
        threshold=threshold,
        c=float(c),
        n_nonpositive=n_nonpositive,
        dim=dim,
        prune_rate=0.0,
        source="none",
        resolution=resolution,
    )


# --------------------------------------------------------------------------------------------
# Step 5: scores


def _split_flat(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat vector in the order of the trainable parameters, as a dict name -> tensor."""
    out, offset = {}, 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        count = param.numel()
        out[name] = flat[offset : offset + count].view(param.shape)
        offset += count
    if offset != flat.shape[0]:
        raise ValueError(
            f"a vector of length {flat.shape[0]} does not match the model's {offset} trainable "
            "parameters"
        )
    return out


def scores(
    model: nn.Module,
    spec: Spectrum | None = None,
    *,
    method: str = "magnitude",
    p: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Step 5: a score per prunable weight (higher is kept).

    * ``magnitude``: ``|w_i|`` at ``W*`` (the authors' later code).
    * ``leverage``: ``||P e_i||_2 = ||V_i||_2``, with ``P = V V^T`` the projector on the top
      eigenvectors ``V`` (the row norm: how much of the top curvature subspace runs through
      weight ``i``).
    * ``curvature``: ``|w_i| * sqrt(sum_j max(lambda_j, 0) V_ij^2)``: eigenvalue-weighted
      leverage times magnitude.

    Args:
        model: the network at ``W*``.
        spec: the :class:`Spectrum` (needed for ``leverage`` and ``curvature``).
        method: one of :data:`SCORES`.
        p: the norm of the leverage; only 2 (for ``p != 2`` ``||P e_i||_p`` needs the dense
            ``d x d`` projector).

    Returns:
        ``dict`` prunable parameter name -> float32 score tensor of the weight's shape.

    Raises:
        ValueError: unknown method, ``spec`` missing, ``p != 2``; for ``leverage`` and
            ``curvature``, a prunable weight that does not require grad (frozen weights are
            outside the Hessian, so they have no score).
    """
    if method not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {method!r}")
    prunable = prunable_parameters(model)
    if method == "magnitude":
        return {name: param.detach().abs().float() for name, param in prunable.items()}
    _check_no_frozen(model, method)
    if spec is None:
        raise ValueError(f"score {method!r} needs the spectrum (spec=)")
    if p != 2:
        raise ValueError(
            f"leverage with p={p} needs the dense d x d projector; only p=2 is supported"
        )
    vectors = spec.top.eigenvectors.detach()
    if method == "leverage":
        flat = vectors.pow(2).sum(1).sqrt()
    else:
        lam = spec.top.eigenvalues.detach().clamp_min(0).to(vectors)
        flat = (vectors.pow(2) * lam).sum(1).sqrt()
    per_param = _split_flat(model, flat)
    out = {}
    for name, param in prunable.items():
        score = per_param[name].float()
        if method == "curvature":
            score = score * param.detach().abs().float()
        out[name] = score
    return out


def _check_no_frozen(model: nn.Module, method: str) -> None:
    """The spectral scores need every prunable weight in the Hessian (the trainable ones)."""
    frozen = [name for name, param in prunable_parameters(model).items() if not param.requires_grad]
    if frozen:
        raise ValueError(
            f"score={method!r} reads the Hessian's eigenvectors, which cover trainable "
            f"parameters only, but the prunable weights {frozen} do not require grad (frozen): "
            "unfreeze them (requires_grad_(True)) or use score='magnitude'"
        )


# --------------------------------------------------------------------------------------------
# Step 7: rewind


def rewind(
    model: nn.Module, masks: dict[str, torch.Tensor], warm: Warmup, *, to: str = "init"
) -> nn.Module:
    """Step 7: load ``W0`` (``to="init"``) or keep ``W*`` (``to="warmup"``), then zero the
    pruned weights; in place, returns the model."""
    if to not in REWINDS:
        raise ValueError(f"rewind must be one of {', '.join(REWINDS)}, got {to!r}")
    if not isinstance(warm, Warmup):
        raise TypeError(f"warm must be the Warmup of step 1, got {type(warm).__name__}")
    check_masks(model, masks)  # before the weights are replaced
    model.load_state_dict(warm.initial if to == "init" else warm.trained)
    apply_masks(model, masks)
    return model


# --------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass
class IMCResult:
    """Everything IMC decided and why.

    Attributes:
        masks: ``dict`` prunable parameter name -> bool mask (True kept).
        sparsity: fraction of the prunable weights pruned.
        auto_sparsity: the sparsity the spectral gap gives (also when ``sparsity`` was set).
        spectrum: the :class:`Spectrum` at ``W*``.
        lipschitz: the :class:`Lipschitz` estimate.
        gap: the :class:`Gap`.
        warmup: the :class:`Warmup` (``W0``, ``W*``, losses).
        model: the pruned model, rewound per ``rewind``.
        layers: per-layer sparsity from :func:`imc_prune.masks.sparsity_report`.
        timings: seconds per step.
        n_hvps: Hessian-vector products spent (spectrum and Lipschitz).
        settings: the choices used (``granularity`` and ``block_size`` among them).
    """

    masks: dict[str, torch.Tensor]
    sparsity: float
    auto_sparsity: float
    spectrum: Spectrum
    lipschitz: Lipschitz
    gap: Gap
    warmup: Warmup
    model: nn.Module
    layers: dict[str, Any]
    timings: dict[str, float]
    n_hvps: int
    settings: dict[str, Any]

    @property
    def weights_remaining(self) -> float:
        """Fraction of the prunable weights kept."""
        return 1.0 - self.sparsity

    @property
    def granularity(self) -> str:
        """The masks' structure, one of :data:`imc_prune.masks.GRANULARITIES`."""
        return self.settings.get("granularity", "element")

    @property
    def block_size(self) -> int | None:
        """The tile edge of ``granularity="block"`` masks, else None."""
        return self.settings.get("block_size")

    def gradient_equivalents(self, hvp_cost: float = 2.0) -> float:
        """IMC's spectral work in gradient evaluations over the Hessian batch: ``n_hvps``
        times the cost of one HVP in gradients (about 2 for the fused engine)."""
        return self.n_hvps * hvp_cost

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        gap = dataclasses.asdict(self.gap)
        for key in ("upper", "width"):
            if not math.isfinite(gap[key]):
                gap[key] = None
        return {
            "sparsity": self.sparsity,
            "auto_sparsity": self.auto_sparsity,
            "weights_remaining": self.weights_remaining,
            "top_eigenvalues": [float(x) for x in self.spectrum.top_eigenvalues],
            "top_residuals": [float(x) for x in self.spectrum.top.residuals.cpu()],
            "lipschitz": self.lipschitz.value,
            "lipschitz_per_direction": self.lipschitz.per_direction,
            "gap": gap,
            "warmup_losses": self.warmup.losses,
            "layers": self.layers,
            "timings": self.timings,
            "n_hvps": self.n_hvps,
            "settings": self.settings,
        }


def _hessian_batch(data, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = first_batch(data, size)
    return inputs.to(device), targets.to(device)


def imc(
    model: nn.Module,
    data: DatasetSplits | torch.utils.data.Dataset,
    *,
    sparsity: str | float = "auto",
    warmup_steps: int = 10,
    warmup_lr: float = 0.1,
    warmup_batch_size: int = 128,
    hessian_batch_size: int = 1024,
    k: int = 32,
    n_probes: int = 8,
    steps: int = 64,
    eps: float = 0.01,
    p: float = 2.0,
    n_directions: int = 3,
    c: float = 4.0,
    score: str = "magnitude",
    scope: str = "global",
    granularity: str = "element",
    block_size: int | None = None,
    rewind_to: str = "init",
    curvature: str = "hessian",
    engine: str = "auto",
    loss_fn: Callable | None = None,
    seed: int = 0,
    progress: bool = False,
    reuse: IMCResult | None = None,
    operator: Callable | None = None,
) -> IMCResult:
    """IMC end to end: warm-up, spectrum, Lipschitz, gap, scores, masks, rewind.

    The caller's model is not modified: IMC works on a copy, returned pruned in
    ``result.model``.

    Args:
        model: the network at its initialisation ``W0``.
        data: a :class:`imc_prune.data.DatasetSplits` (its ``train`` split is used) or a
            map-style training ``Dataset`` (``TensorDataset(x, y)`` for tensors).
        sparsity: ``"auto"`` (the rate from the spectral gap) or a fraction of the prunable
            weights to prune, in ``[0, 1)``.
        warmup_steps, warmup_lr, warmup_batch_size: step 1.
        hessian_batch_size: samples in the Hessian's batch (the first of the training set).
        k, n_probes, steps: step 2 (top eigenpairs; SLQ probes and steps).
        eps, p, n_directions: step 3.
        c: step 4's constant.
        score: step 5, one of :data:`SCORES`.
        scope: ``"global"`` or ``"layerwise"`` masks.
        granularity: the masks' structure (:data:`imc_prune.masks.GRANULARITIES`):
            ``"element"`` (single weights), ``"block"`` (``block_size`` tiles of each weight
            matrix ranked by their summed scores; the kept fraction is the closest whole tiles
            allow) or ``"2:4"`` (2 kept in every 4 along the input dimension; ``sparsity`` must
            then be 0.5, the gap's rate cannot be honoured). See
            :func:`imc_prune.masks.masks_from_scores`.
        block_size: the tile edge, for ``granularity="block"`` only; it must divide both
            dimensions of every prunable weight matrix.
        rewind_to: ``"init"`` (``W0``) or ``"warmup"`` (keep ``W*``).
        curvature: ``"hessian"`` or ``"ggn"``.
        engine: HVP engine.
        loss_fn: the loss of every step; None: cross-entropy for integer targets, MSE for
            float targets (:class:`imc_kernels.HessianOperator`'s rule), picked once from the
            Hessian's batch, so the warm-up, the spectrum and the Lipschitz estimate all work
            on the same objective.
        seed: seeds the warm-up order, the probes and the Lanczos start blocks (an int).
        progress: tqdm bars.
        reuse: an earlier result of the same model (same ``W0``) with the same settings of
            steps 1-4 (:data:`ANALYSIS_SETTINGS`): its warm-up, spectrum, Lipschitz estimate
            and gap are taken as they are, and only the scores, masks and rewind are computed
            (to sweep sparsities and scores at the price of one spectral analysis). The
            result reports the reused work's timings and HVP count, as the cost of the method.
        operator: the Hessian operator's constructor (see :func:`spectrum`); with
            ``functools.partial(DistributedHessianOperator, full_batch=True)`` every rank
            passes the same data and seed, the warmed-up weights are broadcast from rank 0, and
            the spectrum, gap and masks come out identical on every rank.

    Returns:
        An :class:`IMCResult`.

    Raises:
        ValueError: before the warm-up: a setting out of range (:func:`check_settings`); a
            granularity or block size the model's weights do not fit, or ``"2:4"`` at a
            sparsity other than 0.5; a model without prunable weights; frozen prunable
            weights with the ``leverage`` or ``curvature`` score; an empty training set;
            samples the model cannot take, or class indices outside its outputs. After it:
            a Hessian at ``W*`` that is exactly zero; the errors of each step; a ``reuse``
            result whose settings or ``W0`` differ.
        TypeError: a setting of the wrong type (a ``seed`` or ``k`` that is not an int),
            ``data`` that is not a dataset, inputs whose dtype the model's parameters do not
            have.
        FloatingPointError: a warm-up that diverges (:func:`warmup`).

    Example:
        >>> splits = imc_prune.data.load_dataset("digits", flatten=True)
        >>> net = imc_prune.models.build_model("lenet300100", input_shape=(64,))
        >>> res = imc_prune.imc(net, splits, sparsity=0.9)
        >>> round(res.weights_remaining, 2)
        0.1
    """
    settings = {
        "sparsity": sparsity,
        "warmup_steps": warmup_steps,
        "warmup_lr": warmup_lr,
        "warmup_batch_size": warmup_batch_size,
        "hessian_batch_size": hessian_batch_size,
        "k": k,
        "n_probes": n_probes,
        "steps": steps,
        "eps": eps,
        "p": p,
        "n_directions": n_directions,
        "c": c,
        "score": score,
        "scope": scope,
        "granularity": granularity,
        "block_size": block_size,
        "rewind_to": rewind_to,
        "curvature": curvature,
        "engine": engine,
        "seed": seed,
    }
    check_settings({**settings, "loss_fn": loss_fn})
    if granularity == "2:4" and sparsity == "auto":
        raise ValueError(
            "granularity='2:4' keeps exactly 2 of every 4 weights, a sparsity of 0.5; "
            "sparsity='auto' (the spectral gap's rate) cannot be honoured: pass sparsity=0.5"
        )
    train_set = training_set(data)
    prunable = prunable_parameters(model)
    if not prunable:
        raise ValueError(
            "no prunable weights (Linear/Conv2d) in the model: IMC prunes the weights of "
            "nn.Linear and nn.Conv2d layers (their masked subclasses included)"
        )
    if score != "magnitude":
        _check_no_frozen(model, score)
    # Before the warm-up and the spectrum: a structure the weights cannot take fails at once.
    check_granularity(
        granularity,
        block_size,
        sparsity=None if sparsity == "auto" else float(sparsity),
        shapes={name: param.shape for name, param in prunable.items()},
    )
    if len(train_set) == 0:
        raise ValueError(
            "the training set is empty: IMC needs samples to warm up and to take the Hessian on"
        )
    timings: dict[str, float] = {}
    work = copy.deepcopy(model)
    device = _model_device(work)
    if reuse is not None:
        _check_reuse(reuse, work, settings)
        return _finish(
            work,
            reuse.warmup,
            reuse.spectrum,
            reuse.lipschitz,
            reuse.gap,
            settings,
            dict(reuse.timings),
        )

    # The Hessian's batch (the first samples, which the warm-up does not change) fixes the
    # default loss once, for every step, and shows up front whether the model takes the data.
    batch = _hessian_batch(train_set, hessian_batch_size, device)
    loss_fn = resolve_loss(loss_fn, batch[1])
    _check_batch_fits(
        work, batch, loss_fn, data.num_classes if isinstance(data, DatasetSplits) else None
    )

    started = time.perf_counter()
    warm = warmup(
        work,
        train_set,
        steps=warmup_steps,
        lr=warmup_lr,
        batch_size=warmup_batch_size,
        loss_fn=loss_fn,
        seed=seed,
    )
    timings["warmup"] = time.perf_counter() - started
    if _is_distributed(operator):
        from imc_kernels.distributed import broadcast_model

        # Warm-up kernels may round differently on each rank; the operator checks agreement.
        broadcast_model(work)
        warm = dataclasses.replace(warm, trained=_state_copy(work))

    spec = spectrum(
        work,
        batch,
        k=k,
        n_probes=n_probes,
        steps=steps,
        loss_fn=loss_fn,
        curvature=curvature,
        engine=engine,
        seed=seed,
        progress=progress,
        operator=operator,
    )
    timings["spectrum"] = spec.seconds
    _check_nonzero_hessian(spec, warmup_lr, warmup_steps)

    lip = lipschitz(
        work,
        batch,
        eps=eps,
        p=p,
        n_directions=n_directions,
        loss_fn=loss_fn,
        curvature=curvature,
        engine=engine,
        seed=seed,
        progress=progress,
        operator=operator,
    )
    timings["lipschitz"] = lip.seconds

    started = time.perf_counter()
    gap = spectral_gap(spec, lip.value, c=c)
    timings["gap"] = time.perf_counter() - started
    return _finish(work, warm, spec, lip, gap, settings, timings)


def _check_batch_fits(
    model: nn.Module, batch: tuple, loss_fn: Callable, num_classes: int | None
) -> None:
    """The model's forward on the Hessian's batch (eval mode, no grad: nothing changes) and
    its targets against the model's outputs, before any work is spent."""
    inputs, targets = batch
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            output = forward(model, inputs)
    finally:
        for module, training in modes:
            module.training = training
    check_class_targets(output, targets, loss_fn, num_classes=num_classes)


def _check_nonzero_hessian(spec: Spectrum, warmup_lr: float, warmup_steps: int) -> None:
    """A Hessian that is exactly zero has no gap to find: every prune rate would be noise."""
    largest = float(spec.top_eigenvalues.abs().max())
    if not largest > 0:
        raise ValueError(
            f"the Hessian at W* is zero (its largest eigenvalue magnitude is {largest}): the "
            "loss has no curvature there and the spectral gap is undefined. A dead network "
            "(every ReLU inactive, saturated outputs) does this, e.g. after a warm-up at too "
            f"large an lr: lower warmup_lr (now {warmup_lr}) or warmup_steps (now "
            f"{warmup_steps}), or check the model's initialisation"
        )


def _check_choice(choices: tuple[str, ...]) -> Callable:
    def check(value, name: str) -> None:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")

    return check


def _check_sparsity_setting(value, name: str) -> None:
    if value != "auto" and not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    ):
        raise ValueError(f"{name} must be 'auto' or a fraction in [0, 1), got {value!r}")


def _check_norm(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 1:
        raise ValueError(
            f"{name} must be at least 1 (an l_p norm, math.inf allowed), got {value!r}"
        )


def _check_loss_fn(value, name: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__}")


# How each keyword argument of imc() is checked before any work (those not listed are checked
# together, granularity and block_size, or where they are used, reuse and operator).
_SETTING_CHECKS: dict[str, Callable] = {
    "sparsity": _check_sparsity_setting,
    "warmup_steps": lambda value, name: check_positive_int(value, name, allow_zero=True),
    "warmup_lr": check_positive_real,
    "warmup_batch_size": check_positive_int,
    "hessian_batch_size": check_positive_int,
    "k": check_positive_int,
    "n_probes": check_positive_int,
    "steps": check_positive_int,
    "eps": check_positive_real,
    "p": _check_norm,
    "n_directions": check_positive_int,
    "c": check_positive_real,
    "score": _check_choice(SCORES),
    "scope": _check_choice(SCOPES),
    "rewind_to": _check_choice(REWINDS),
    "curvature": _check_choice(CURVATURES),
    "engine": _check_choice(ENGINES),
    "loss_fn": _check_loss_fn,
    "seed": lambda value, name: check_seed(value),
}


def check_settings(settings: Mapping[str, Any]) -> None:
    """Check keyword arguments of :func:`imc` by name, before any work is done.

    :func:`imc` calls this first; :class:`imc_prune.experiment.RunSpec` calls it on its
    ``imc`` settings, so that a typo or a value out of range fails when the spec is made,
    not when the run reaches it.

    Args:
        settings: any of :data:`SETTINGS` (the keyword arguments of :func:`imc`) with values.

    Raises:
        TypeError: not a mapping; a value of the wrong type (a ``k`` given as a string).
        ValueError: a name :func:`imc` does not take; a value out of range (``k=0``,
            ``c<=0``, an unknown score, ...); a bad mask structure.

    Example:
        >>> check_settings({"k": 8, "c": 2.0, "score": "leverage"})
        >>> check_settings({"kk": 3})
        Traceback (most recent call last):
        ValueError: unknown imc settings ['kk']; imc() takes sparsity, warmup_steps, ...
    """
    if not isinstance(settings, Mapping):
        raise TypeError(f"imc settings must be a dict, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown imc settings {unknown}; imc() takes {', '.join(SETTINGS)}")
    for name, value in settings.items():
        check = _SETTING_CHECKS.get(name)
        if check is not None:
            check(value, name)
    if "granularity" in settings or "block_size" in settings:
        check_granularity(settings.get("granularity", "element"), settings.get("block_size"))


def _is_distributed(operator) -> bool:
    """Whether ``operator`` (a constructor, possibly a ``functools.partial``) builds the
    data-parallel operator."""
    if operator is None:
        return False
    from imc_kernels.distributed import DistributedHessianOperator

    target = getattr(operator, "func", operator)
    return isinstance(target, type) and issubclass(target, DistributedHessianOperator)


#: The keyword arguments of :func:`imc`, the names :func:`check_settings` accepts.
SETTINGS = tuple(
    name
    for name, parameter in inspect.signature(imc).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)

#: The settings of steps 1-4, which ``imc(reuse=...)`` requires to be equal.
ANALYSIS_SETTINGS = (
    "warmup_steps",
    "warmup_lr",
    "warmup_batch_size",
    "hessian_batch_size",
    "k",
    "n_probes",
    "steps",
    "eps",
    "p",
    "n_directions",
    "c",
    "curvature",
    "engine",
    "seed",
)


def _check_reuse(reuse: IMCResult, model: nn.Module, settings: dict) -> None:
    if not isinstance(reuse, IMCResult):
        raise TypeError(f"reuse must be an IMCResult, got {type(reuse).__name__}")
    differ = [key for key in ANALYSIS_SETTINGS if reuse.settings.get(key) != settings.get(key)]
    if differ:
        detail = ", ".join(f"{k}={reuse.settings.get(k)!r} vs {settings.get(k)!r}" for k in differ)
        raise ValueError(f"reuse: the earlier result's settings differ ({detail})")
    initial = reuse.warmup.initial
    state = model.state_dict()
    if initial.keys() != state.keys() or any(
        not torch.equal(initial[name].cpu(), state[name].detach().cpu()) for name in state
    ):
        raise ValueError("reuse: the earlier result started from different weights (W0)")


def _finish(
    work: nn.Module,
    warm: Warmup,
    spec: Spectrum,
    lip: Lipschitz,
    gap: Gap,
    settings: dict,
    timings: dict[str, float],
) -> IMCResult:
    """Steps 5-7 on the analysis of steps 1-4: scores at ``W*``, masks, rewind."""
    started = time.perf_counter()
    work.load_state_dict(warm.trained)
    n_prunable = sum(param.numel() for param in prunable_parameters(work).values())
    # The rule prunes d - n of all d weights; only weight matrices are prunable, so the same
    # count is a larger fraction of them (capped below 1).
    auto_sparsity = min((gap.dim - gap.n) / n_prunable, 1.0 - 1.0 / n_prunable)
    sparsity = settings["sparsity"]
    chosen = auto_sparsity if sparsity == "auto" else float(sparsity)
    weight_scores = scores(work, spec, method=settings["score"])
    masks = masks_from_scores(
        weight_scores,
        chosen,
        scope=settings["scope"],
        granularity=settings.get("granularity", "element"),
        block_size=settings.get("block_size"),
    )
    timings["masks"] = time.perf_counter() - started

    rewind(work, masks, warm, to=settings["rewind_to"])
    report = sparsity_report(work, masks)
    return IMCResult(
        masks=masks,
        sparsity=1.0 - float(report["weights_remaining"]),
        auto_sparsity=float(auto_sparsity),
        spectrum=spec,
        lipschitz=lip,
        gap=gap,
        warmup=warm,
        model=work,
        layers=report,
        timings=timings,
        n_hvps=spec.n_hvps + lip.n_hvps,
        settings=settings,
    )
