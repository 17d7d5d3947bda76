"""Baseline pruning methods, each returning the mask type of :mod:`imc_prune.masks`.

At initialisation (no training):

- :func:`random`: uniform random scores.
- :func:`magnitude`: ``|w|`` of the current weights (after IMC's warm-up this is the score the
  IMC authors' later code uses).
- :func:`snip`: connection sensitivity ``|g ⊙ w|`` (Lee et al., ICLR 2019).
- :func:`grasp`: gradient signal preservation, ``S = -w ⊙ (H g)``, removing the highest
  scores (Wang et al., ICLR 2020); ``H g`` comes from :class:`imc_kernels.HessianOperator`.
- :func:`synflow`: iterative synaptic flow, data-free (Tanaka et al., NeurIPS 2020).

With training (Lottery Ticket Hypothesis, Frankle & Carbin, ICLR 2019):

- :func:`one_shot_magnitude`: train dense, keep the largest trained weights, rewind.
- :func:`imp`: iterative magnitude pruning, 20 percent of the remaining weights per round,
  rewinding to ``W0`` or to an early iteration (Frankle et al., ICML 2020).

Every method takes ``granularity`` and ``block_size`` (see
:func:`imc_prune.masks.masks_from_scores`): masks of single weights (``"element"``, the
default), of ``block_size`` tiles ranked by their summed scores (``"block"``), or keeping 2 of
every 4 weights along the input dimension (``"2:4"``, at sparsity 0.5 only). The structure is
checked against the model's weights before any score is computed or any network trained.

Scores are computed on the caller's model without changing it (weights, gradients, mode and
buffers are left as they were); the methods that train work on a deep copy and return the
weights to train the masked network from in :attr:`PruneInfo.rewind_state`.

Example:
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> masks = synflow(model, 0.9, input_shape=(1, 8, 8), iterations=10)
    >>> round(sparsity_report(model, masks)["weights_remaining"], 3)
    0.1
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

import imc_kernels
from imc_kernels.hvp._common import resolve_loss
from imc_prune._checks import check_class_targets, check_seed, forward, is_int
from imc_prune.masks import (
    check_granularity,
    check_masks,
    check_sparsity,
    dense_masks,
    masks_from_scores,
    prunable_parameters,
    sparsity_report,
    weights_per_unit,
)
from imc_prune.train import TrainResult, planned_steps, resolve_config, train

__all__ = [
    "PruneInfo",
    "grasp",
    "grasp_scores",
    "imp",
    "imp_schedule",
    "magnitude",
    "magnitude_scores",
    "one_shot_magnitude",
    "random",
    "random_scores",
    "snip",
    "snip_scores",
    "synflow",
    "synflow_scores",
]

Masks = dict[str, torch.Tensor]
# Below every real score (scores here are >= 0): entries already pruned sort last, so an
# iterative method never revives a weight it removed, even when survivors score 0.
_PRUNED_SCORE = -1.0
_RESOLVE_KEYS = (
    "preset",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "epochs",
    "steps",
    "lr_milestones",
)


# --------------------------------------------------------------------------------------------
# Scores at initialisation


def random_scores(model: nn.Module, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform ``[0, 1)`` scores, drawn on the CPU from ``seed`` (the same on every device).

    Raises:
        TypeError: a ``seed`` that is not an int.

    Example:
        >>> random_scores(nn.Linear(3, 2), seed=0)["weight"].shape
        torch.Size([2, 3])
    """
    generator = torch.Generator().manual_seed(check_seed(seed))
    return {
        name: torch.rand(param.shape, generator=generator, dtype=torch.float64).to(param.device)
        for name, param in prunable_parameters(model).items()
    }


def random(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "global",
    seed: int = 0,
    granularity: str = "element",
    block_size: int | None = None,
) -> Masks:
    """Random pruning: every prunable weight (tile, pair of a group of 4) equally likely to
    be kept.

    Args:
        model: the network (not modified).
        sparsity: fraction of prunable weights to remove, in ``[0, 1)``.
        scope: ``"global"`` (exactly ``round((1 - s) N)`` kept over all layers) or
            ``"layerwise"`` (the same fraction in every layer).
        seed: the random draw, an int.
        granularity, block_size: the masks' structure (module docstring).

    Returns:
        A mask set.

    Raises:
        ValueError: bad sparsity, scope or structure.
        TypeError: a ``seed`` that is not an int.

    Example:
        >>> masks = random(nn.Linear(10, 10), 0.3, seed=1)
        >>> int(masks["weight"].sum())
        70
    """
    sparsity = check_sparsity(sparsity)
    seed = check_seed(seed)
    _check_structure(model, granularity, block_size, sparsity)
    return masks_from_scores(
        random_scores(model, seed=seed),
        sparsity,
        scope=scope,
        granularity=granularity,
        block_size=block_size,
    )


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """``|w|`` of every prunable weight.

    Example:
        >>> magnitude_scores(nn.Linear(3, 2))["weight"].min() >= 0
        tensor(True)
    """
    return {name: p.detach().abs() for name, p in prunable_parameters(model).items()}


def magnitude(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "global",
    granularity: str = "element",
    block_size: int | None = None,
) -> Masks:
    """Magnitude pruning of the current weights: keep the largest ``|w|`` (the tiles with the
    largest ``sum |w|`` for ``granularity="block"``).

    Args:
        model: the network (not modified).
        sparsity: fraction to remove, in ``[0, 1)``.
        scope: ``"global"`` or ``"layerwise"``.
        granularity, block_size: the masks' structure (module docstring).

    Returns:
        A mask set.

    Raises:
        ValueError: bad sparsity, scope or structure.

    Example:
        >>> layer = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     layer.weight.copy_(torch.tensor([[0.1, -2.0]]))
        >>> magnitude(layer, 0.5)["weight"]
        tensor([[False,  True]])
        >>> magnitude(nn.Linear(8, 4), 0.5, granularity="block", block_size=2)["weight"].sum()
        tensor(16)
    """
    sparsity = check_sparsity(sparsity)
    _check_structure(model, granularity, block_size, sparsity)
    return masks_from_scores(
        magnitude_scores(model),
        sparsity,
        scope=scope,
        granularity=granularity,
        block_size=block_size,
    )


def snip_scores(model: nn.Module, batch, *, loss_fn: Callable | None = None) -> Masks:
    """SNIP connection sensitivity ``|dL/dw ⊙ w|`` (the derivative of the loss with respect
    to a multiplicative mask at 1), in eval mode, on one batch.

    Args:
        model: the network (not modified; no ``.grad`` is written).
        batch: ``(inputs, targets)`` on the model's device.
        loss_fn: ``loss_fn(output, targets)``; None: cross-entropy for integer targets, MSE
            for float targets.

    Returns:
        ``{name: score}`` for every prunable weight.

    Raises:
        ValueError: a bad or empty batch, samples the model cannot take, class indices
            outside its outputs, or a prunable weight that does not require grad.
        TypeError: inputs whose dtype the model's parameters do not have.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
        >>> sorted(snip_scores(model, batch))
        ['0.weight', '2.weight']
    """
    inputs, targets = _unpack_batch(batch)
    loss_fn = resolve_loss(loss_fn, targets)
    weights = _trainable_prunable(model)
    with _eval_mode(model), torch.enable_grad():
        output = forward(model, inputs)
        check_class_targets(output, targets, loss_fn)
        loss = loss_fn(output, targets)
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    return {
        name: (_or_zeros(g, w) * w.detach()).abs() for (name, w), g in zip(weights.items(), grads)
    }


def snip(
    model: nn.Module,
    batch,
    sparsity: float,
    *,
    loss_fn: Callable | None = None,
    scope: str = "global",
    granularity: str = "element",
    block_size: int | None = None,
) -> Masks:
    """SNIP (Lee, Ajanthan & Torr, ICLR 2019): keep the largest ``|g ⊙ w|`` at init.

    Args:
        model: the network at initialisation (not modified).
        batch: ``(inputs, targets)`` on the model's device (the paper uses one batch of
            about 100 samples for 10 classes).
        sparsity: fraction to remove, in ``[0, 1)``.
        loss_fn: as :func:`snip_scores`.
        scope: ``"global"`` (the paper) or ``"layerwise"``.
        granularity, block_size: the masks' structure (module docstring).

    Returns:
        A mask set.

    Raises:
        ValueError: bad sparsity, scope, structure or batch.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
        >>> sum(int(m.sum()) for m in snip(model, batch, 0.5).values())
        9
    """
    sparsity = check_sparsity(sparsity)
    _check_structure(model, granularity, block_size, sparsity)
    return masks_from_scores(
        snip_scores(model, batch, loss_fn=loss_fn),
        sparsity,
        scope=scope,
        granularity=granularity,
        block_size=block_size,
    )


def grasp_scores(
    model: nn.Module,
    batch,
    *,
    loss_fn: Callable | None = None,
    temperature: float = 200.0,
    engine: str = "auto",
) -> Masks:
    """GraSP scores ``S = -w ⊙ (H g)`` on the temperature-scaled loss.

    ``L_T(w) = loss_fn(model(x) / T, y)``; ``g`` is its gradient restricted to the prunable
    weights (zero on biases and normalisation parameters, as in the paper, which takes the
    gradient and Hessian over the weights only) and ``H`` its Hessian, applied by
    :class:`imc_kernels.HessianOperator` (in eval mode). The temperature loss is not one the
    fused engine knows, so ``engine="auto"`` takes ``torch.func``.

    Args:
        model: the network at initialisation (not modified).
        batch: ``(inputs, targets)`` on the model's device.
        loss_fn: as :func:`snip_scores`.
        temperature: ``T`` (the paper uses 200; 1 is the plain loss).
        engine: the HVP engine (``"auto"``, ``"func"``, ``"double_backward"``).

    Returns:
        ``{name: score}``; a large score means removing the weight reduces the gradient
        flow the least (or increases it), so GraSP removes the highest scores.

    Raises:
        ValueError: bad temperature, a bad or empty batch, samples the model cannot take,
            class indices outside its outputs, or a prunable weight that does not require
            grad.
        TypeError: inputs whose dtype the model's parameters do not have.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
        >>> grasp_scores(model, batch)["2.weight"].shape
        torch.Size([2, 3])
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    inputs, targets = _unpack_batch(batch)
    base_loss = resolve_loss(loss_fn, targets)
    scale = 1.0 / float(temperature)

    def tempered_loss(output, target):
        return base_loss(output * scale, target)

    weights = _trainable_prunable(model)
    with _eval_mode(model), torch.enable_grad():
        output = forward(model, inputs)
        check_class_targets(output, targets, base_loss)
        loss = tempered_loss(output, targets)
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    gradient = {name: _or_zeros(g, w).detach() for (name, w), g in zip(weights.items(), grads)}

    hessian = imc_kernels.HessianOperator(model, tempered_loss, (inputs, targets), engine=engine)
    flat = [
        gradient[name].reshape(-1) if name in gradient else torch.zeros_like(p).reshape(-1)
        for name, p in zip(hessian.layout.names, hessian.layout.params)
    ]
    product = hessian.as_params(hessian.matvec(torch.cat(flat)))
    return {name: -(w.detach() * product[name]) for name, w in weights.items()}


def grasp(
    model: nn.Module,
    batch,
    sparsity: float,
    *,
    loss_fn: Callable | None = None,
    temperature: float = 200.0,
    scope: str = "global",
    engine: str = "auto",
    granularity: str = "element",
    block_size: int | None = None,
) -> Masks:
    """GraSP (Wang, Zhang & Grosse, ICLR 2020): remove the weights with the highest
    ``-w ⊙ (H g)``, those whose removal least reduces the gradient norm after pruning.

    Args:
        model: the network at initialisation (not modified).
        batch: ``(inputs, targets)`` on the model's device (the paper: 10 samples per class).
        sparsity: fraction to remove, in ``[0, 1)``.
        loss_fn, temperature, engine: as :func:`grasp_scores`.
        scope: ``"global"`` (the paper) or ``"layerwise"``.
        granularity, block_size: the masks' structure (module docstring); tiles are ranked
            by their summed scores, lowest kept.

    Returns:
        A mask set keeping the ``round((1 - s) N)`` lowest scores (ties to the lower index).

    Raises:
        ValueError: bad sparsity, scope, structure, temperature or batch.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
        >>> sum(int(m.sum()) for m in grasp(model, batch, 0.5).values())
        9
    """
    sparsity = check_sparsity(sparsity)
    _check_structure(model, granularity, block_size, sparsity)
    scores = grasp_scores(model, batch, loss_fn=loss_fn, temperature=temperature, engine=engine)
    return masks_from_scores(
        {k: -s for k, s in scores.items()},
        sparsity,
        scope=scope,
        granularity=granularity,
        block_size=block_size,
    )


def synflow_scores(
    model: nn.Module,
    input_shape,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
) -> Masks:
    """SynFlow scores ``|dR/dθ ⊙ θ|`` of the linearised network, ``R = 1ᵀ f_|θ|(1)``.

    The network is copied, every floating parameter and buffer replaced by its absolute
    value (the paper's ``linearize``; BatchNorm in eval mode uses the absolute running
    statistics), the pruned weights zeroed, and ``R`` is the sum of the outputs on one input
    of all ones. For a bias-free linear net ``f = W_2 W_1 x`` that is
    ``score(W_1)_ij = |W_1|_ij (1ᵀ|W_2|)_i`` and ``score(W_2)_ki = |W_2|_ki (|W_1| 1)_i``.

    Args:
        model: the network (not modified: the work happens on a copy).
        input_shape: shape of one input, without the batch dimension.
        masks: weights already pruned (scored 0), or None.
        dtype: precision of the copy (float64: ``R`` is a product over all layers and
            overflows fp32 in deep networks).

    Returns:
        ``{name: score}`` in ``dtype``.

    Raises:
        ValueError: a bad ``input_shape`` (one the model cannot take included) or masks.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
        >>> sorted(synflow_scores(model, (3,)))
        ['0.weight', '1.weight']
    """
    input_shape = _check_input_shape(input_shape)
    if masks is not None:
        check_masks(model, masks)
    work, originals = _linearised_copy(model, dtype)
    if masks is not None:
        _load_masked(work, originals, {**dense_masks(work), **masks})
    return _synflow_pass(work, input_shape)


def synflow(
    model: nn.Module,
    sparsity: float,
    *,
    input_shape,
    iterations: int = 100,
    scope: str = "global",
    dtype: torch.dtype = torch.float64,
    granularity: str = "element",
    block_size: int | None = None,
) -> Masks:
    """SynFlow (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020): iterative, data-free.

    For ``k = 1..iterations`` the kept fraction follows the exponential schedule
    ``(1 - s)^(k / iterations)``; each iteration rescores the masked linearised network
    (:func:`synflow_scores`) and keeps the top scores among the survivors. The last iteration
    lands exactly on ``sparsity``; masks are nested. The caller's model is untouched (the
    paper's sign restore is implicit: the linearisation happens on a copy).

    With ``granularity="block"`` every iteration keeps whole tiles (pruned tiles score below
    every survivor, so masks stay nested). ``granularity="2:4"`` has one sparsity, 0.5, and no
    schedule to follow: the dense network is scored once and each group of 4 keeps its 2 best
    (the schedule exists to avoid layer collapse, which 2:4 rules out: every layer keeps half).

    Args:
        model: the network at initialisation (not modified).
        sparsity: fraction to remove, in ``[0, 1)``.
        input_shape: shape of one input, without the batch dimension (``data.input_shape``).
        iterations: pruning iterations (the paper uses 100).
        scope: ``"global"`` (the paper) or ``"layerwise"``.
        dtype: precision of the linearised copy.
        granularity, block_size: the masks' structure (module docstring).

    Returns:
        A mask set.

    Raises:
        ValueError: bad sparsity, scope, structure, iterations or input shape.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> masks = synflow(model, 0.75, input_shape=(8,), iterations=5)
        >>> sum(int(m.sum()) for m in masks.values())
        20
    """
    sparsity = check_sparsity(sparsity)
    if not is_int(iterations) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    input_shape = _check_input_shape(input_shape)
    _check_structure(model, granularity, block_size, sparsity)
    work, originals = _linearised_copy(model, dtype)
    masks = dense_masks(work)
    if sparsity == 0.0:
        return masks
    structure = {"scope": scope, "granularity": granularity, "block_size": block_size}
    if granularity == "2:4":
        _load_masked(work, originals, masks)
        return masks_from_scores(_synflow_pass(work, input_shape), sparsity, **structure)
    density = 1.0 - sparsity
    for k in range(1, iterations + 1):
        _load_masked(work, originals, masks)
        scores = _synflow_pass(work, input_shape)
        scores = {name: s.masked_fill(~masks[name], _PRUNED_SCORE) for name, s in scores.items()}
        step_sparsity = sparsity if k == iterations else 1.0 - density ** (k / iterations)
        masks = masks_from_scores(scores, step_sparsity, **structure)
    return masks


def _linearised_copy(model: nn.Module, dtype: torch.dtype):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    work = copy.deepcopy(model).to(dtype)
    work.eval()
    with torch.no_grad():
        for tensor in [*work.parameters(), *work.buffers()]:
            if tensor.is_floating_point():
                tensor.abs_()
    work.requires_grad_(False)
    prunable = prunable_parameters(work)
    if not prunable:
        raise ValueError("the model has no prunable weights (Linear or Conv2d)")
    for param in prunable.values():
        param.requires_grad_(True)
    originals = {name: p.detach().clone() for name, p in prunable.items()}
    return work, originals


@torch.no_grad()
def _load_masked(work: nn.Module, originals: Mapping, masks: Mapping) -> None:
    prunable = prunable_parameters(work)
    for name, original in originals.items():
        prunable[name].copy_(original.masked_fill(~masks[name], 0.0))


def _synflow_pass(work: nn.Module, input_shape: tuple) -> Masks:
    prunable = prunable_parameters(work)
    param = next(iter(prunable.values()))
    ones = torch.ones((1, *input_shape), dtype=param.dtype, device=param.device)
    hint = (
        f"input_shape={input_shape} is not what the model takes: pass the shape of one input "
        "without the batch dimension (data.input_shape of the data it is trained on)"
    )
    with torch.enable_grad():
        flow = forward(work, ones, hint=hint).sum()
        grads = torch.autograd.grad(flow, list(prunable.values()), allow_unused=True)
    return {
        name: (_or_zeros(g, p) * p.detach()).abs() for (name, p), g in zip(prunable.items(), grads)
    }


def _check_input_shape(input_shape) -> tuple:
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if (
        not isinstance(input_shape, (tuple, list))
        or not input_shape
        or not all(is_int(n) and n >= 1 for n in input_shape)
    ):
        raise ValueError(
            f"input_shape must be the shape of one input without the batch dimension, a "
            f"tuple of positive ints such as (1, 28, 28), got {input_shape!r}"
        )
    return tuple(int(n) for n in input_shape)


# --------------------------------------------------------------------------------------------
# Lottery tickets: train, prune by magnitude, rewind


@dataclasses.dataclass
class PruneInfo:
    """How a training-based baseline reached its masks.

    Attributes:
        method: ``"one_shot_magnitude"`` or ``"imp"``.
        sparsity: the target sparsity of the returned masks.
        rounds: train-prune rounds (0 when ``sparsity`` is 0).
        trained_sparsities: the sparsity each round trained at (round 1 is dense).
        round_sparsities: the sparsity of the masks each round produced; the last is the
            target.
        accuracies: final test accuracy of each round's training run.
        mean_last3_accuracies: mean test accuracy of the last three epochs of each run.
        sgd_steps: SGD steps of all rounds together (the training of the returned masks,
            which the caller runs, is not included).
        wall_s: wall time in seconds.
        rewind_step: the SGD step the survivors are rewound to (0 = ``W0``), or None when
            they keep the trained weights.
        rewind_state: ``state_dict`` to train the masked network from (load it, then call
            :func:`imc_prune.train` with the masks).
        results: each round's :class:`imc_prune.train.TrainResult`.
        granularity: the masks' structure, one of :data:`imc_prune.masks.GRANULARITIES`.
        block_size: the tile edge for ``granularity="block"``, else None.
    """

    method: str
    sparsity: float
    rounds: int
    trained_sparsities: list[float]
    round_sparsities: list[float]
    accuracies: list[float]
    mean_last3_accuracies: list[float]
    sgd_steps: int
    wall_s: float
    rewind_step: int | None
    rewind_state: dict[str, torch.Tensor]
    results: list[TrainResult]
    granularity: str = "element"
    block_size: int | None = None

    @property
    def trained_acc(self) -> float | None:
        """Test accuracy of the last network trained before the final pruning."""
        return self.accuracies[-1] if self.accuracies else None


def one_shot_magnitude(
    model: nn.Module,
    data,
    sparsity: float,
    *,
    rewind: str | int | None = "init",
    train_kwargs: Mapping | None = None,
    scope: str = "global",
    granularity: str = "element",
    block_size: int | None = None,
) -> tuple[Masks, PruneInfo]:
    """One-shot lottery ticket: train dense, keep the largest trained weights, rewind.

    Args:
        model: the network at initialisation ``W0`` (not modified: a copy is trained).
        data: a :class:`imc_prune.data.DatasetSplits`.
        sparsity: fraction to remove, in ``[0, 1)``.
        rewind: ``"init"`` (``W0``, the LTH), an int ``k`` (the weights after ``k`` SGD
            steps of the dense run, Frankle et al. 2020), or ``"trained"``/None (keep the
            trained weights: prune and fine-tune).
        train_kwargs: keyword arguments of :func:`imc_prune.train` (a ``preset``, ``epochs``
            or ``steps``, ``seed``, ...); a ``callback`` there is called as usual.
        scope: ``"global"`` or ``"layerwise"``.
        granularity, block_size: the masks' structure (module docstring); checked before
            the dense training.

    Returns:
        ``(masks, info)``; ``info.trained_acc`` is the dense accuracy, ``info.rewind_state``
        the weights to train the ticket from.

    Raises:
        ValueError: bad sparsity, scope, structure, rewind or training arguments.

    Example:
        >>> data = load_dataset("digits", flatten=True)
        >>> model = build_model("lenet300100", input_shape=data.input_shape, seed=0)
        >>> masks, info = one_shot_magnitude(model, data, 0.8, train_kwargs={"epochs": 1})
        >>> info.rounds, info.sgd_steps
        (1, 24)
    """
    started = time.perf_counter()
    sparsity = check_sparsity(sparsity)
    _check_structure(model, granularity, block_size, sparsity)
    rewind_step = _check_rewind(rewind)
    kwargs, user_callback = _check_train_kwargs(train_kwargs, data, rewind_step)
    work = copy.deepcopy(model)
    initial = _snapshot(work)
    snapshots: dict[int, dict] = {}
    capture = _capture(user_callback, rewind_step, snapshots)
    result = train(work, None, data, **kwargs, callback=capture)
    masks = masks_from_scores(
        magnitude_scores(work),
        sparsity,
        scope=scope,
        granularity=granularity,
        block_size=block_size,
    )
    if rewind_step is None:
        state = _snapshot(work)
    else:
        state = initial if rewind_step == 0 else snapshots[rewind_step]
    return masks, PruneInfo(
        method="one_shot_magnitude",
        sparsity=sparsity,
        rounds=1,
        trained_sparsities=[0.0],
        round_sparsities=[1.0 - sparsity_report(work, masks)["weights_remaining"]],
        accuracies=[result.final_acc],
        mean_last3_accuracies=[result.mean_last3_acc],
        sgd_steps=result.sgd_steps,
        wall_s=time.perf_counter() - started,
        rewind_step=rewind_step,
        rewind_state=state,
        results=[result],
        granularity=granularity,
        block_size=block_size,
    )


def imp_schedule(n_weights: int, sparsity: float, rate: float = 0.2) -> list[int]:
    """Kept-weight counts after each IMP round: ``rate`` of the remaining weights go per
    round (rounded to whole weights, at least one) until the target count
    ``round((1 - sparsity) n)`` is reached; the last round lands exactly on it.

    Example:
        >>> imp_schedule(1000, 0.5)
        [800, 640, 512, 500]
    """
    sparsity = check_sparsity(sparsity)
    _check_rate(rate)
    target = int(round((1.0 - sparsity) * n_weights))
    kept, counts = n_weights, []
    while kept > target:
        kept = max(target, min(kept - 1, int(round(kept * (1.0 - rate)))))
        counts.append(kept)
    return counts


def imp(
    model: nn.Module,
    data,
    sparsity: float,
    *,
    rate: float = 0.2,
    rewind_step: int = 0,
    train_kwargs: Mapping | None = None,
    scope: str = "global",
    callback: Callable[[int, Masks, TrainResult], object] | None = None,
    granularity: str = "element",
    block_size: int | None = None,
) -> tuple[Masks, PruneInfo]:
    """Iterative magnitude pruning with rewinding (LTH; Frankle & Carbin 2019).

    Round ``r``: train the network (dense in round 1, masked after) from the rewind point,
    remove ``rate`` of the remaining prunable weights with the smallest trained magnitude
    (:func:`imp_schedule`; global by default, biases kept), then rewind the survivors. The
    rewind point is ``W0`` (``rewind_step=0``) or the weights after ``rewind_step`` SGD
    steps of the first, dense run (late rewinding, Frankle et al. 2020). Every round trains
    with the same ``train_kwargs``. The last round's masks are returned; training them from
    ``info.rewind_state`` is left to the caller (so IMP trains ``rounds + 1`` times in all).

    With ``granularity="block"`` the schedule counts tiles instead of weights (every round
    removes ``rate`` of the surviving tiles, at least one). ``granularity="2:4"`` is refused:
    2:4 masks exist at sparsity 0.5 only, so there is no sequence of rounds to take
    (:func:`one_shot_magnitude` prunes to 2:4 in one round).

    Args:
        model: the network at initialisation ``W0`` (not modified: a copy is trained).
        data: a :class:`imc_prune.data.DatasetSplits`.
        sparsity: target fraction to remove, in ``[0, 1)``.
        rate: fraction of the remaining weights removed per round, in ``(0, 1)``.
        rewind_step: SGD step to rewind to; 0 is ``W0``.
        train_kwargs: keyword arguments of :func:`imc_prune.train`.
        scope: ``"global"`` (the paper's choice for the conv nets) or ``"layerwise"``.
        callback: ``callback(round, masks, result)`` after each round (1-based), with that
            round's masks and training result.
        granularity, block_size: the masks' structure (module docstring); ``"element"`` or
            ``"block"``.

    Returns:
        ``(masks, info)`` with the rounds, per-round accuracies and the total SGD steps.

    Raises:
        ValueError: bad sparsity, rate, scope, structure (``"2:4"`` included), rewind step
            (also one past the length of a training run) or training arguments.

    Example:
        >>> data = load_dataset("digits", flatten=True)
        >>> model = build_model("lenet300100", input_shape=data.input_shape, seed=0)
        >>> masks, info = imp(model, data, 0.5, train_kwargs={"steps": 20})
        >>> info.rounds, info.sgd_steps
        (4, 80)
    """
    started = time.perf_counter()
    sparsity = check_sparsity(sparsity)
    _check_rate(rate)
    if scope not in ("global", "layerwise"):
        raise ValueError(f"scope must be one of ('global', 'layerwise'), got {scope!r}")
    if granularity == "2:4":
        raise ValueError(
            "imp cannot prune to granularity='2:4': 2:4 masks exist at sparsity 0.5 only, so "
            "there are no rounds of 20 % to take; use one_shot_magnitude(granularity='2:4')"
        )
    _check_structure(model, granularity, block_size, sparsity)
    if not is_int(rewind_step) or rewind_step < 0:
        raise ValueError(f"rewind_step must be an int >= 0, got {rewind_step!r}")
    kwargs, user_callback = _check_train_kwargs(train_kwargs, data, rewind_step)
    work = copy.deepcopy(model)
    initial = _snapshot(work)
    masks = dense_masks(work)
    # Counted in the units the masks keep or prune together: weights, or tiles.
    n_units = sum(mask.numel() for mask in masks.values()) // weights_per_unit(
        granularity, block_size
    )
    counts = imp_schedule(n_units, sparsity, rate)

    snapshots: dict[int, dict] = {}
    results: list[TrainResult] = []
    trained_sparsities: list[float] = []
    round_sparsities: list[float] = []
    rewind_state = initial
    for round_index, kept in enumerate(counts, start=1):
        trained_sparsities.append(_mask_sparsity(masks))
        work.load_state_dict(rewind_state)
        capture = _capture(user_callback, rewind_step if round_index == 1 else 0, snapshots)
        result = train(work, masks if round_index > 1 else None, data, **kwargs, callback=capture)
        results.append(result)
        scores = {
            name: s.masked_fill(~masks[name], _PRUNED_SCORE)
            for name, s in magnitude_scores(work).items()
        }
        masks = masks_from_scores(
            scores,
            1.0 - kept / n_units,
            scope=scope,
            granularity=granularity,
            block_size=block_size,
        )
        round_sparsities.append(_mask_sparsity(masks))
        if round_index == 1 and rewind_step > 0:
            rewind_state = snapshots[rewind_step]
        if callback is not None:
            callback(round_index, masks, result)
    return masks, PruneInfo(
        method="imp",
        sparsity=sparsity,
        rounds=len(counts),
        trained_sparsities=trained_sparsities,
        round_sparsities=round_sparsities,
        accuracies=[r.final_acc for r in results],
        mean_last3_accuracies=[r.mean_last3_acc for r in results],
        sgd_steps=sum(r.sgd_steps for r in results),
        wall_s=time.perf_counter() - started,
        rewind_step=rewind_step,
        rewind_state=rewind_state,
        results=results,
        granularity=granularity,
        block_size=block_size,
    )


# --------------------------------------------------------------------------------------------
# Helpers


def _check_structure(model: nn.Module, granularity: str, block_size, sparsity: float) -> None:
    """The masks' structure against the model's weights, before any score or training."""
    check_granularity(
        granularity,
        block_size,
        sparsity=sparsity,
        shapes={name: param.shape for name, param in prunable_parameters(model).items()},
    )


def _check_rate(rate) -> None:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 < rate < 1.0:
        raise ValueError(f"rate must lie in (0, 1) (fraction pruned per round), got {rate!r}")


def _check_rewind(rewind) -> int | None:
    if rewind == "init":
        return 0
    if rewind is None or rewind == "trained":
        return None
    if is_int(rewind) and rewind >= 0:
        return int(rewind)
    raise ValueError(f"rewind must be 'init', 'trained', None or an int step >= 0, got {rewind!r}")


def _check_train_kwargs(train_kwargs, data, rewind_step: int | None):
    """``train_kwargs`` without its callback, and the callback (None if absent)."""
    if train_kwargs is not None and not isinstance(train_kwargs, Mapping):
        raise TypeError(f"train_kwargs must be a dict, got {type(train_kwargs).__name__}")
    kwargs = dict(train_kwargs or {})
    user_callback = kwargs.pop("callback", None)
    for reserved in ("model", "masks", "data"):
        if reserved in kwargs:
            raise ValueError(f"train_kwargs must not contain {reserved!r}; it is set here")
    config = resolve_config(**{k: kwargs[k] for k in _RESOLVE_KEYS if k in kwargs})
    if data is None or not hasattr(data, "train"):
        raise TypeError("data must be a DatasetSplits (imc_prune.data.load_dataset)")
    if rewind_step:
        total = planned_steps(config, len(data.train))
        if rewind_step > total:
            raise ValueError(
                f"rewind step {rewind_step} is past the end of a training run ({total} steps)"
            )
    return kwargs, user_callback


def _capture(user: Callable | None, rewind_step: int | None, snapshots: dict) -> Callable:
    """A train() callback: snapshots the weights at ``rewind_step`` (when positive), then
    calls the caller's own callback from ``train_kwargs``."""

    def callback(step: int, model: nn.Module) -> None:
        if rewind_step and step == rewind_step:
            snapshots[step] = _snapshot(model)
        if user is not None:
            user(step, model)

    return callback


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(mask.numel() for mask in masks.values())
    return 1.0 - sum(int(mask.sum()) for mask in masks.values()) / total


def _unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("batch must be a pair (inputs, targets)")
    inputs, targets = batch
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("batch must hold two tensors (inputs, targets)")
    if targets.dim() == 0 or inputs.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs of shape {tuple(inputs.shape)} and targets of shape "
            f"{tuple(targets.shape)} must share their first (batch) dimension"
        )
    if inputs.shape[0] == 0:
        # Every score would be 0 and the tie-break alone would pick the masks.
        raise ValueError("the score batch is empty: give it samples (inputs, targets)")
    return inputs, targets


def _trainable_prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    weights = prunable_parameters(model)
    if not weights:
        raise ValueError("the model has no prunable weights (Linear or Conv2d)")
    frozen = [name for name, p in weights.items() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"prunable weights {frozen} do not require grad; gradient-based scores need them "
            "trainable"
        )
    return weights


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # A weight the loss does not reach has zero gradient (autograd returns None for it).
    return torch.zeros_like(like) if grad is None else grad


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    previous = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in previous:
            module.training = training
