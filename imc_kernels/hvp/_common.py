"""Pieces every HVP engine shares: batch and loss validation, flat-vector layout."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CURVATURES = ("hessian", "ggn")
ENGINES = ("auto", "fused", "func", "double_backward")
MODES = ("eval", "train")


@dataclasses.dataclass
class ParamLayout:
    """Where each trainable parameter sits in a flat vector (``model.parameters()`` order)."""

    names: list[str]
    params: list[torch.Tensor]
    offsets: list[int]
    numels: list[int]
    dim: int

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        names, params = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                names.append(name)
                params.append(param)
        if not params:
            raise ValueError(
                "the model has no trainable parameters (every parameter has requires_grad=False);"
                " the Hessian is taken with respect to trainable parameters"
            )
        numels = [p.numel() for p in params]
        offsets = [0]
        for n in numels[:-1]:
            offsets.append(offsets[-1] + n)
        return cls(names, params, offsets, numels, sum(numels))

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def split_block(self, block: torch.Tensor) -> list[torch.Tensor]:
        """``(dim, b)`` -> per parameter ``(b, *shape)`` tensors (contiguous)."""
        rows = block.T
        if not rows.is_contiguous():
            # Written through the transposed destination, as in join_block: 0.27 against
            # 1.2 ms for block.T.contiguous() at dim = 266,610, b = 4 (one thread).
            rows = torch.empty(
                block.shape[1], block.shape[0], dtype=block.dtype, device=block.device
            )
            rows.T.copy_(block)
        return [
            rows[:, off : off + n].view(rows.shape[0], *p.shape)
            for off, n, p in zip(self.offsets, self.numels, self.params)
        ]

    def join_block(
        self, pieces: Sequence[torch.Tensor], b: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per parameter ``(b, *shape)`` tensors -> ``(dim, b)`` contiguous (into ``out`` when
        given; a piece that already is its slice of ``out``, written in place, is not copied)."""
        if out is None:
            out = torch.empty(self.dim, b, dtype=self.dtype, device=self.device)
        for off, n, piece in zip(self.offsets, self.numels, pieces):
            if b == 1 and piece.data_ptr() == out[off].data_ptr() and piece.is_contiguous():
                continue
            # Written through the transposed destination, read contiguously: the other way
            # round (a (n, b) source view with stride (1, n)) takes TensorIterator's slow path
            # on CPU, 0.78 / 1.82 ms against 0.013 / 0.41 ms at b = 1 / 8 for 235,200 weights.
            out[off : off + n].T.copy_(piece.reshape(b, n))
        return out

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat ``(dim,)`` vector -> ``{name: tensor shaped like the parameter}``."""
        return dict(zip(self.names, self.parameter_views(vector), strict=True))

    def parameter_views(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """A flat ``(dim,)`` vector -> views shaped like the parameters, in order."""
        return [
            vector[off : off + n].view(p.shape)
            for off, n, p in zip(self.offsets, self.numels, self.params)
        ]


def check_block(vectors: torch.Tensor, layout: ParamLayout) -> tuple[torch.Tensor, bool]:
    """Validate ``v`` of shape ``(dim,)`` or ``(dim, b)``; return ``(block, was_vector)``.

    Raises:
        ValueError: wrong rank or length.
        TypeError: not a tensor, wrong dtype or device.
    """
    if not isinstance(vectors, torch.Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(vectors).__name__}")
    if vectors.dim() not in (1, 2):
        raise ValueError(f"v must have shape (dim,) or (dim, b), got {tuple(vectors.shape)}")
    if vectors.shape[0] != layout.dim:
        raise ValueError(
            f"v has length {vectors.shape[0]} but the model has {layout.dim} trainable "
            "parameters (flat vectors follow model.parameters() order, trainable only)"
        )
    if vectors.dtype != layout.dtype:
        raise TypeError(f"v has dtype {vectors.dtype}, the model's parameters are {layout.dtype}")
    if vectors.device != layout.device:
        raise TypeError(f"v is on {vectors.device}, the model's parameters are on {layout.device}")
    if vectors.dim() == 1:
        return vectors.unsqueeze(1), True
    return vectors, False


def unpack_batch(batch, layout: ParamLayout) -> tuple[object, torch.Tensor]:
    """Validate ``batch = (inputs, targets)``.

    Raises:
        ValueError: not a pair, or inputs and targets of different batch sizes.
        TypeError: tensors on another device than the model.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("batch must be a pair (inputs, targets)")
    inputs, targets = batch
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    tensors = _tensors_in(inputs)
    if not tensors:
        raise TypeError("inputs must be a tensor or a tuple/dict of tensors")
    for tensor in [*tensors, targets]:
        if tensor.device != layout.device:
            raise TypeError(
                f"batch tensor on {tensor.device} but the model is on {layout.device}; "
                "move the batch to the model's device"
            )
    n_inputs = tensors[0].shape[0] if tensors[0].dim() else None
    if targets.dim() == 0 or (n_inputs is not None and targets.shape[0] != n_inputs):
        raise ValueError(
            f"inputs hold {n_inputs} samples but targets have shape {tuple(targets.shape)}; "
            "the first dimension of both must be the batch size"
        )
    return inputs, targets


def _tensors_in(inputs) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, (tuple, list)):
        return [t for t in inputs if isinstance(t, torch.Tensor)]
    if isinstance(inputs, dict):
        return [t for t in inputs.values() if isinstance(t, torch.Tensor)]
    return []


def call_model(model: nn.Module, inputs):
    """Run the model on ``inputs`` (a tensor, tuple of positional inputs, or dict of kwargs)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def resolve_loss(loss_fn: Callable | None, targets: torch.Tensor) -> Callable:
    """``None`` means cross-entropy for integer targets and MSE for float targets.

    Float targets whose rows are one-hot get MSE too, with a warning: such targets are
    usually class labels meant for cross-entropy, whose Hessian is a different matrix.
    """
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        return loss_fn
    if targets.dtype.is_floating_point:
        if _one_hot_rows(targets):
            warnings.warn(
                "the float targets are one-hot rows, so the default loss for float targets, "
                "MSE, is used and this is the MSE Hessian; for cross-entropy pass class "
                "indices (targets.argmax(1)) or loss_fn=nn.CrossEntropyLoss()",
                stacklevel=3,
            )
        return nn.MSELoss()
    if targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"cannot pick a default loss for targets of dtype {targets.dtype}")
    return nn.CrossEntropyLoss()


def _one_hot_rows(targets: torch.Tensor) -> bool:
    """Whether ``(N, C)`` float targets, ``C >= 2``, hold one 1 and zeros elsewhere per row."""
    if targets.dim() != 2 or targets.shape[1] < 2 or targets.shape[0] == 0:
        return False
    ones = targets == 1
    return bool(((ones | (targets == 0)).all() & (ones.sum(1) == 1).all()).item())


def check_batch_not_empty(targets: torch.Tensor) -> None:
    """Raises ValueError for a batch of no samples (its mean loss would be NaN)."""
    if targets.shape[0] == 0:
        raise ValueError(
            "the batch is empty (0 samples); the loss and its Hessian need at least one sample"
        )


# Integer class-index targets that F.cross_entropy refuses (it takes int64 and uint8): cast to
# int64 so that every engine sees the same targets (the fused kernel takes any integer type).
_NARROW_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.uint8)


def prepare_targets(loss_fn: Callable, targets: torch.Tensor) -> torch.Tensor:
    """``targets``, with narrow integer class indices of cross-entropy cast to int64."""
    if is_cross_entropy(loss_fn) and targets.dtype in _NARROW_INDEX_DTYPES:
        return targets.long()
    return targets


def check_targets(output, targets: torch.Tensor, loss_fn: Callable) -> None:
    """Clear errors for the common model/loss/target mistakes, before they become NaNs or
    crashes.

    Raises:
        TypeError: the model returned something else than one tensor.
        ValueError: cross-entropy on outputs other than ``(N, C, ...)``, class-index targets
            of the wrong shape or out of range, every target ``ignore_index`` (mean
            reduction), or MSE targets of the wrong shape.
    """
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"the model must return one tensor, got {type(output).__name__}; wrap it in a "
            "module whose forward returns the output the loss takes"
        )
    if is_cross_entropy(loss_fn) and not targets.dtype.is_floating_point:
        _check_class_indices(output, targets, loss_fn)
    if is_mse(loss_fn) and targets.shape != output.shape:
        raise ValueError(
            f"MSE targets have shape {tuple(targets.shape)} but the model output has shape "
            f"{tuple(output.shape)}"
        )


def class_index_masks(
    targets: torch.Tensor, n_classes: int, loss_fn: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bad, valid)`` boolean masks of class-index targets for a cross-entropy ``loss_fn``:
    ``valid`` the targets that are not its ``ignore_index`` (-100 by default), ``bad`` the
    valid ones outside ``[0, n_classes)``. The one definition behind the HVP operator's target
    check and the pruning layer's (``imc_prune._checks.check_class_targets``), which word
    their errors for their own callers."""
    ignore = getattr(loss_fn, "ignore_index", -100)
    valid = targets != ignore
    return valid & ((targets < 0) | (targets >= n_classes)), valid


def _check_class_indices(output: torch.Tensor, targets: torch.Tensor, loss_fn: Callable) -> None:
    if output.dim() < 2:
        raise ValueError(
            f"cross-entropy takes model outputs of shape (N, C), one score per class, got "
            f"shape {tuple(output.shape)}; for one output per sample use another loss (e.g. "
            "nn.BCEWithLogitsLoss with float targets)"
        )
    want = (output.shape[0], *output.shape[2:])
    if tuple(targets.shape) != want:
        raise ValueError(
            f"cross-entropy class-index targets must have shape {want} (one class index per "
            f"sample) for model outputs of shape {tuple(output.shape)}, got "
            f"{tuple(targets.shape)}; e.g. targets.view(-1) drops a trailing dimension of 1"
        )
    n_classes = output.shape[1]
    bad, valid = class_index_masks(targets, n_classes, loss_fn)
    # One host read for both checks (this runs once per operator).
    any_bad, any_valid = torch.stack([bad.any(), valid.any()]).tolist()
    if any_bad:
        raise ValueError(
            f"cross-entropy targets must lie in [0, {n_classes}) for a model with "
            f"{n_classes} outputs; found {targets[bad][:5].tolist()}"
        )
    if not any_valid and getattr(loss_fn, "reduction", "mean") == "mean":
        raise ValueError(
            f"every target is ignore_index ({getattr(loss_fn, 'ignore_index', -100)}): the mean "
            "cross-entropy over no samples is undefined (NaN); give the batch at least one "
            "labelled sample"
        )


def check_loss(loss) -> None:
    """Raises TypeError or ValueError unless ``loss`` is a 0-dim tensor (what
    ``loss_fn`` must return)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            f"loss_fn must return a scalar (a 0-dim tensor), got shape {tuple(loss.shape)}; "
            "use reduction='mean' or 'sum'"
        )


def is_cross_entropy(loss_fn) -> bool:
    return isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy


def is_mse(loss_fn) -> bool:
    return isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss


def check_finite_loss(loss: torch.Tensor) -> None:
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(
            f"the loss is not finite ({loss.item()}) at these parameters and this batch; "
            "the Hessian is undefined there"
        )


def check_finite_product(product: torch.Tensor, engine: str) -> None:
    # One pass, no overflow of its own: min and max propagate NaN and show inf. (A float64
    # sum, the earlier test, also upcast the block: 1.18 against 0.16 ms at 266,610 x 8 on CPU.)
    smallest, largest = torch.aminmax(product)
    if not bool(torch.isfinite(smallest) & torch.isfinite(largest)):
        raise FloatingPointError(
            f"the Hessian-vector product ({engine} engine) is not finite; check the input "
            "vectors and the model's parameters for inf/NaN or overflow"
        )


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """No TF32 inside the operator (DESIGN section 6): fp32 products stay fp32."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


STOCHASTIC_MODULES = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def stochastic_modules(model: nn.Module) -> list[str]:
    """Names of the Dropout/BatchNorm modules, which behave differently in train mode."""
    return [
        name or type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, STOCHASTIC_MODULES)
    ]
