"""Input checks shared by IMC, the training loop and the baselines.

Each turns a mistake a user makes with real data (a model built for another input shape or
class count, a dtype mismatch, a tuple of tensors where a dataset belongs, a seed that is
not an int) into an error that names the problem and says what to change, at the first
batch, instead of torch's message from deep inside a layer or, worse, a silent wrong answer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from imc_kernels.hvp._common import class_index_masks, is_cross_entropy
from imc_kernels.linalg.block_lanczos import check_seed as check_seed  # one seed check for both
from imc_prune.data import DatasetSplits


def is_int(value) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(value, name: str, *, allow_zero: bool = False) -> int:
    """``value`` as an int ``>= 1`` (``>= 0`` with ``allow_zero``).

    Raises:
        TypeError: not an int.
        ValueError: below the bound.
    """
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < (0 if allow_zero else 1):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} int, got {value}")
    return int(value)


def check_positive_real(value, name: str) -> float:
    """``value`` as a finite float ``> 0``.

    Raises:
        TypeError: not a real number.
        ValueError: not finite or not positive.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def training_set(data) -> Dataset:
    """The training split of ``data``: ``data.train`` of a ``DatasetSplits``, or ``data``
    itself when it is a map-style ``Dataset``.

    Raises:
        TypeError: anything else (a tuple of tensors, a DataLoader, an iterable dataset); the
            message says how to build a dataset from it.
    """
    if isinstance(data, DatasetSplits):
        return data.train
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return data
    if isinstance(data, DataLoader):
        how = "pass its dataset (loader.dataset); batches are drawn here"
    elif isinstance(data, (tuple, list)):
        how = "for tensors x, y use torch.utils.data.TensorDataset(x, y)"
    else:
        how = (
            "use imc_prune.data.load_dataset(...), or torch.utils.data.TensorDataset(x, y) "
            "for tensors"
        )
    raise TypeError(
        f"data must be a DatasetSplits or a map-style Dataset (got {type(data).__name__}); {how}"
    )


def sample_hint(inputs: torch.Tensor) -> str:
    """What to change when a model does not take the data's samples."""
    sample = tuple(inputs.shape[1:])
    flatten = "load with flatten=True for an MLP, or " if len(sample) > 1 else ""
    return f"the data's samples are {sample} ({flatten}build the model with input_shape={sample})"


def forward(model: nn.Module, inputs: torch.Tensor, *, hint: str | None = None) -> torch.Tensor:
    """``model(inputs)``, with a failure re-raised naming the inputs' shape or dtype.

    Args:
        model: the network.
        inputs: a batch.
        hint: what to change when the shapes do not fit; default :func:`sample_hint`.

    Returns:
        The model's output.

    Raises:
        TypeError: the forward failed and the inputs' floating dtype differs from the
            model's parameters'.
        ValueError: the forward failed otherwise (torch's message included, typically a
            shape that does not fit the first layer).
    """
    try:
        return model(inputs)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
        if inputs.is_floating_point() and dtypes and str(inputs.dtype) not in dtypes:
            raise TypeError(
                f"the model's forward failed on inputs of dtype {inputs.dtype}: {exc}; the "
                f"model's parameters are {', '.join(dtypes)}: give both one dtype (convert "
                f"the model, e.g. model.to({inputs.dtype}), or the data)"
            ) from exc
        raise ValueError(
            f"the model's forward failed on inputs of shape {tuple(inputs.shape)}: {exc}; "
            f"{hint if hint is not None else sample_hint(inputs)}"
        ) from exc


def check_class_targets(
    output: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable,
    *,
    num_classes: int | None = None,
) -> None:
    """Class-index targets against the model's output width, for a cross-entropy loss.

    Other losses, float targets (probabilities) and outputs that are not ``(N, C)`` are left
    to the loss.

    Args:
        output: the model's output on the batch.
        targets: the batch's targets.
        loss_fn: the loss; only cross-entropy is checked.
        num_classes: the dataset's class count, when known (named in the message).

    Raises:
        ValueError: targets that are not ``(N,)``, or a class index outside ``[0, C)``.
    """
    if not is_cross_entropy(loss_fn) or targets.is_floating_point() or output.dim() != 2:
        return
    width = output.shape[1]
    if targets.shape != output.shape[:1]:
        raise ValueError(
            f"cross-entropy targets must be class indices of shape ({output.shape[0]},) for "
            f"outputs of shape {tuple(output.shape)}; got targets of shape "
            f"{tuple(targets.shape)}"
        )
    bad, _ = class_index_masks(targets, width, loss_fn)
    if not bool(bad.any()):
        return
    found = ", ".join(str(v) for v in torch.unique(targets[bad]).tolist()[:5])
    if num_classes is not None:
        fix = (
            f"the dataset has {num_classes} classes: build the model with num_classes={num_classes}"
        )
    else:
        fix = "build the model with one output per class of the data"
    raise ValueError(
        f"targets must lie in [0, {width}) for a model with {width} outputs; found {found} ({fix})"
    )


def resolve_device(device) -> torch.device:
    """``device`` as a ``torch.device`` (None or ``"auto"``: CUDA when available).

    Raises:
        ValueError: a name torch does not know, or a CUDA device that is not there (instead
            of torch's assertion deep inside the first allocation).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{device!r} is not a device ({exc})") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = " (a CPU-only build)" if torch.version.cuda is None else ""
            raise ValueError(
                f"device {resolved} asked for, but torch {torch.__version__}{build} sees no "
                "CUDA device; use cpu, or auto to take CUDA when there is one"
            )
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {resolved} asked for, but torch sees {count} CUDA device(s)")
    return resolved
