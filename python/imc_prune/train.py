"""Sparse-masked training: the loop used by IMC and every baseline.

:func:`train` trains a model in place with one of the masked optimizers of
:mod:`imc_kernels.masked` (SGD, Adam, AdamW), so the pruned weights are set to zero when the
optimizer is made and stay exactly zero after every step. The test accuracy is measured after
each epoch in eval mode. The Lottery Ticket schedules (Frankle & Carbin 2019) are presets:

==============  =========  ========  =====  ========  ===========  ==========  ================
preset          optimizer  lr        batch  momentum  weight decay  length      lr x0.1 at step
==============  =========  ========  =====  ========  ===========  ==========  ================
``lth_lenet``   adam       1.2e-3    60                             10 epochs
``lth_conv2``   adam       2e-4      60                             20k steps
``lth_conv4``   adam       3e-4      60                             25k steps
``lth_conv6``   adam       3e-4      60                             30k steps
``lth_vgg``     sgd        0.1       64     0.9       1e-4          112k steps  56k, 84k
``lth_resnet``  sgd        0.1       128    0.9       1e-4          30k steps   20k, 25k
==============  =========  ========  =====  ========  ===========  ==========  ================

``lth_lenet`` is the benchmark protocol of this project (10 epochs); the Conv, VGG-19 and
ResNet-20 lengths and learning-rate drops are the paper's. Explicit arguments override a
preset; an explicit ``epochs`` or ``steps`` replaces the preset's length.

Example:
    >>> data = load_dataset("digits", flatten=True)
    >>> model = build_model("lenet300100", input_shape=(64,), seed=0)
    >>> result = train(model, None, data, preset="lth_lenet", epochs=2)
    >>> len(result.history), result.sgd_steps
    (2, 48)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from imc_kernels.masked import MaskedAdam, MaskedAdamW, MaskedSGD
from imc_prune._checks import check_class_targets, check_seed, forward, is_int, resolve_device
from imc_prune.data import iterate_batches
from imc_prune.masks import check_masks

OPTIMIZERS = {"sgd": MaskedSGD, "adam": MaskedAdam, "adamw": MaskedAdamW}

#: The Lottery Ticket training schedules; see the module docstring.
PRESETS: dict[str, dict] = {
    "lth_lenet": {"optimizer": "adam", "lr": 1.2e-3, "batch_size": 60, "epochs": 10},
    "lth_conv2": {"optimizer": "adam", "lr": 2e-4, "batch_size": 60, "steps": 20_000},
    "lth_conv4": {"optimizer": "adam", "lr": 3e-4, "batch_size": 60, "steps": 25_000},
    "lth_conv6": {"optimizer": "adam", "lr": 3e-4, "batch_size": 60, "steps": 30_000},
    "lth_vgg": {
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "batch_size": 64,
        "steps": 112_000,
        "lr_milestones": (56_000, 84_000),
    },
    "lth_resnet": {
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "batch_size": 128,
        "steps": 30_000,
        "lr_milestones": (20_000, 25_000),
    },
}

# Values used when neither the call nor the preset sets them (the lth_lenet protocol).
_DEFAULTS = {
    "optimizer": "adam",
    "lr": 1.2e-3,
    "momentum": 0.9,
    "batch_size": 60,
    "lr_milestones": (),
}
# torch.optim's own default decay: none for SGD and Adam (L2), 1e-2 for AdamW (decoupled).
_DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 1e-2}
# Factor applied to the learning rate at each milestone (the LTH step schedule).
_LR_DROP = 0.1


@dataclasses.dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        history: one dict per evaluated epoch: ``epoch`` (1-based), ``step`` (SGD steps done
            so far), ``train_loss`` (mean cross-entropy over the epoch's samples),
            ``test_acc`` (fraction correct) and ``test_loss`` (mean cross-entropy). A run that
            stops mid-epoch (``steps``) evaluates once more where it stopped.
        final_acc: ``test_acc`` of the last entry.
        mean_last3_acc: mean ``test_acc`` of the last three entries (fewer if fewer).
        steps: optimizer steps taken in this run.
        wall_s: wall time of the run in seconds, evaluations included.
        sgd_steps: training compute in SGD steps (one forward and backward pass of a batch
            each); equals ``steps`` for this loop, kept separate so that callers adding up
            the compute of several methods sum one field.
        config: the resolved settings (optimizer, lr, batch size, length, ...).
    """

    history: list[dict]
    final_acc: float
    mean_last3_acc: float
    steps: int
    wall_s: float
    sgd_steps: int
    config: dict = dataclasses.field(default_factory=dict)


def resolve_config(
    preset: str | None = None,
    *,
    optimizer: str | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    lr_milestones=None,
) -> dict:
    """The training settings after applying a preset, explicit arguments and defaults.

    Args:
        preset: a name from :data:`PRESETS`, or None.
        optimizer, lr, momentum, weight_decay, batch_size, epochs, steps, lr_milestones: as
            for :func:`train`; None takes the preset's value, else the default.

    Returns:
        ``{"optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs", "steps",
        "lr_milestones", "preset"}`` with exactly one of ``epochs`` and ``steps`` set.

    Raises:
        ValueError: unknown preset or optimizer, both ``epochs`` and ``steps`` given, neither
            given nor set by the preset, or a value out of range.
        TypeError: a value of the wrong type.

    Example:
        >>> resolve_config("lth_conv2", epochs=3)["epochs"], resolve_config("lth_conv2")["lr"]
        (3, 0.0002)
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}")
    if epochs is not None and steps is not None:
        raise ValueError(f"give epochs or steps, not both (got epochs={epochs}, steps={steps})")
    base = dict(PRESETS[preset]) if preset is not None else {}
    if epochs is not None or steps is not None:
        base.pop("epochs", None)
        base.pop("steps", None)
    explicit = {
        "optimizer": optimizer,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "epochs": epochs,
        "steps": steps,
        "lr_milestones": lr_milestones,
    }
    config = {**_DEFAULTS, **base, **{k: v for k, v in explicit.items() if v is not None}}
    config.setdefault("epochs", None)
    config.setdefault("steps", None)
    if config["optimizer"] not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {config['optimizer']!r}"
        )
    config.setdefault("weight_decay", _DEFAULT_WEIGHT_DECAY[config["optimizer"]])
    if config["epochs"] is None and config["steps"] is None:
        raise ValueError("say how long to train: give epochs= or steps= (or a preset)")
    for key in ("batch_size", "epochs", "steps"):
        value = config[key]
        if value is not None and (not is_int(value) or value < 1):
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    for key in ("lr", "momentum", "weight_decay"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{key} must be a real number, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} must be finite and >= 0, got {value}")
    milestones = tuple(config["lr_milestones"])
    if not all(is_int(m) and m >= 1 for m in milestones):
        raise ValueError(f"lr_milestones must be positive step counts, got {milestones!r}")
    config["lr_milestones"] = milestones
    config["preset"] = preset
    return config


def planned_steps(config: Mapping, n_train: int) -> int:
    """SGD steps a run of ``config`` (from :func:`resolve_config`) takes on ``n_train`` samples.

    Example:
        >>> planned_steps(resolve_config("lth_lenet"), 60_000)
        10000
    """
    if config["steps"] is not None:
        return int(config["steps"])
    return int(config["epochs"]) * math.ceil(n_train / config["batch_size"])


def train(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    data=None,
    *,
    optimizer: str | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    preset: str | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    eval_batch_size: int = 1000,
    callback: Callable[[int, nn.Module], object] | None = None,
    lr_milestones=None,
) -> TrainResult:
    """Train ``model`` in place with cross-entropy, keeping the pruned weights exactly zero.

    The masked optimizer zeros the pruned weights when it is made, multiplies each gradient
    by the mask and the weights again after each step, and keeps its state zero on pruned
    entries. Batches are drawn in an order fixed by ``seed``, and dropout draws from a
    generator seeded by ``seed`` too (the caller's global RNG state is left as it was), so
    the same seed on the same device gives the same bits.

    Args:
        model: the network, trained in place (moved to ``device`` when one is given); its
            train/eval mode is restored at the end.
        masks: a mask set from :mod:`imc_prune.masks` (True = kept), or None for dense.
        data: a :class:`imc_prune.data.DatasetSplits`: trains on ``data.train``, evaluates
            on ``data.test``.
        optimizer: ``"adam"`` (default), ``"sgd"`` or ``"adamw"``.
        lr: learning rate (default 1.2e-3).
        momentum: SGD momentum (default 0.9; unused by Adam).
        weight_decay: L2 penalty for SGD and Adam, decoupled decay for AdamW (default 0,
            AdamW 1e-2).
        batch_size: training batch size (default 60).
        epochs: passes over the training set.
        steps: stop after exactly this many SGD steps, mid-epoch if need be. Give ``epochs``
            or ``steps`` (or a preset that sets one).
        preset: a name from :data:`PRESETS`; explicit arguments override it.
        seed: seeds the batch order and dropout.
        device: where to train (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` or a
            ``torch.device``, checked by :func:`imc_prune._checks.resolve_device`); None
            keeps the model's device.
        progress: show a tqdm bar over the steps.
        eval_batch_size: batch size of the per-epoch test evaluation.
        callback: ``callback(step, model)`` is called once before the first step with
            ``step=0`` and after every SGD step with the number of steps done; copying
            ``model.state_dict()`` there snapshots an early-iteration rewind point.
        lr_milestones: SGD steps after which the learning rate is multiplied by 0.1.

    Returns:
        A :class:`TrainResult`.

    Raises:
        TypeError: no ``data`` or data without ``train``/``test`` splits; masks of the
            wrong type; a ``seed`` that is not an int; targets that are not integer class
            labels; inputs whose dtype the model's parameters do not have.
        ValueError: unknown preset or optimizer, a bad length or ``eval_batch_size``, masks
            naming parameters the model lacks or cannot prune, an empty training set, a
            device that is not there, samples the model cannot take (checked on the first
            batch), class labels outside the model's outputs.
        FloatingPointError: the training loss became NaN or infinite.

    Example:
        >>> data = load_dataset("digits", flatten=True)
        >>> model = build_model("lenet300100", input_shape=(64,), seed=0)
        >>> masks = baselines.random(model, 0.9)
        >>> result = train(model, masks, data, steps=100, lr=1e-3)
        >>> result.steps, bool((model[1].weight[~masks["1.weight"]] == 0).all())
        (100, True)
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_data(data)
    config = resolve_config(
        preset,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        epochs=epochs,
        steps=steps,
        lr_milestones=lr_milestones,
    )
    seed = check_seed(seed)
    if not is_int(eval_batch_size) or eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be a positive int, got {eval_batch_size!r}")
    n_train = len(data.train)
    if n_train == 0:
        raise ValueError("the training set is empty")
    if device is not None:
        model.to(resolve_device(device))
    device = _model_device(model)
    masks = {} if masks is None else masks
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict name -> bool tensor, got {type(masks).__name__}")
    masks = {
        name: mask.to(device) if isinstance(mask, torch.Tensor) else mask
        for name, mask in masks.items()
    }
    check_masks(model, masks)

    total = planned_steps(config, n_train)
    steps_per_epoch = math.ceil(n_train / config["batch_size"])
    n_epochs = math.ceil(total / steps_per_epoch)
    opt = _make_optimizer(model, masks, config)
    milestones = set(config["lr_milestones"])
    generator = torch.Generator().manual_seed(int(seed))
    was_training = [(module, module.training) for module in model.modules()]

    history: list[dict] = []
    step = 0
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, leave=False)
    try:
        with torch.random.fork_rng(devices=_cuda_devices(device)):
            torch.manual_seed(int(seed))
            if callback is not None:
                callback(0, model)
            for epoch in range(1, n_epochs + 1):
                model.train()
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                seen = 0
                for inputs, targets in iterate_batches(
                    data.train, config["batch_size"], shuffle=True, generator=generator
                ):
                    inputs, targets = inputs.to(device), targets.to(device)
                    opt.zero_grad(set_to_none=True)
                    if step:
                        logits = model(inputs)
                    else:
                        logits = _first_forward(model, inputs, targets, data)
                    loss = F.cross_entropy(logits, targets)
                    loss.backward()
                    opt.step()
                    step += 1
                    if step in milestones:
                        for group in opt.param_groups:
                            group["lr"] *= _LR_DROP
                    # Accumulated on the device: no host sync per step.
                    loss_sum += loss.detach().double() * targets.shape[0]
                    seen += targets.shape[0]
                    bar.update(1)
                    if callback is not None:
                        callback(step, model)
                    if step == total:
                        break
                train_loss = float(loss_sum) / seen
                if not math.isfinite(train_loss):
                    raise FloatingPointError(
                        f"the training loss became {train_loss} in epoch {epoch} (by step "
                        f"{step}); lower the learning rate (lr={config['lr']})"
                    )
                test_acc, test_loss = evaluate(model, data.test, eval_batch_size, device)
                history.append(
                    {
                        "epoch": epoch,
                        "step": step,
                        "train_loss": train_loss,
                        "test_acc": test_acc,
                        "test_loss": test_loss,
                    }
                )
                bar.set_postfix(loss=f"{train_loss:.4f}", acc=f"{test_acc:.4f}")
                if step == total:
                    break
    finally:
        bar.close()
        for module, training in was_training:
            module.training = training

    accuracies = [entry["test_acc"] for entry in history]
    last3 = accuracies[-3:]
    return TrainResult(
        history=history,
        final_acc=accuracies[-1],
        mean_last3_acc=sum(last3) / len(last3),
        steps=step,
        wall_s=time.perf_counter() - started,
        sgd_steps=step,
        config=config,
    )


def _check_data(data) -> None:
    if data is None:
        raise TypeError("train() needs data: a DatasetSplits (imc_prune.data.load_dataset)")
    if not (hasattr(data, "train") and hasattr(data, "test")):
        raise TypeError(
            f"data must be a DatasetSplits with train and test splits, got {type(data).__name__}"
        )


def _first_forward(model: nn.Module, inputs, targets, data) -> torch.Tensor:
    """The first batch's forward, checked: the model must take the data's samples and have
    an output per class of its targets."""
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(
            "train() fits a classifier with cross-entropy on class indices: the targets must "
            f"be integer labels, got dtype {targets.dtype}"
        )
    logits = forward(model, inputs)
    check_class_targets(
        logits, targets, F.cross_entropy, num_classes=getattr(data, "num_classes", None)
    )
    return logits


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    raise ValueError("the model has no parameters to train")


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _make_optimizer(model: nn.Module, masks: Mapping, config: Mapping) -> torch.optim.Optimizer:
    kind = config["optimizer"]
    hyper = {"lr": config["lr"], "weight_decay": config["weight_decay"]}
    if kind == "sgd":
        hyper["momentum"] = config["momentum"]
    return OPTIMIZERS[kind].from_model(model, dict(masks), **hyper)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``dataset``, in eval mode.

    Args:
        model: a classifier; its train/eval mode is restored afterwards.
        dataset: a map-style dataset of ``(x, y)`` pairs, e.g. ``data.test``.
        batch_size: evaluation batch size.
        device: where to run; None uses the model's device (the model is not moved).

    Returns:
        ``(accuracy, loss)``: fraction of correct argmax predictions and mean cross-entropy.

    Raises:
        TypeError: a DatasetSplits instead of one split.
        ValueError: an empty dataset, a bad batch size, or a device that is not there.

    Example:
        >>> data = load_dataset("digits", flatten=True)
        >>> acc, loss = evaluate(build_model("lenet300100", input_shape=(64,)), data.test)
        >>> 0.0 <= acc <= 1.0
        True
    """
    if hasattr(dataset, "train") and hasattr(dataset, "test"):
        raise TypeError("evaluate() takes one split: pass data.test (or data.train)")
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = _model_device(model) if device is None else resolve_device(device)
    previous = [(module, module.training) for module in model.modules()]
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for inputs, targets in iterate_batches(dataset, batch_size):
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
            correct += (logits.argmax(dim=1) == targets).sum()
    finally:
        for module, training in previous:
            module.training = training
    return int(correct) / n, float(loss_sum) / n
