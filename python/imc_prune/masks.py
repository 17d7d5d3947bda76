"""Pruning masks: which weights a model keeps.

A mask set is a plain ``dict[str, torch.Tensor]``: the key is a parameter name from
``model.named_parameters()``, the value a ``torch.bool`` tensor of the parameter's shape,
``True`` where the weight is kept. Only prunable parameters appear: the ``weight`` of every
``nn.Linear`` and ``nn.Conv2d`` (their masked subclasses in :mod:`imc_kernels.masked` included).
Biases and normalisation layers are never pruned. A mask set may leave prunable parameters
out; those are kept whole.

Every pruning method of the package (IMC and each baseline) produces this type, and
:func:`imc_prune.train` consumes it.

Example:
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> scores = {name: p.detach().abs() for name, p in prunable_parameters(model).items()}
    >>> masks = masks_from_scores(scores, 0.5)
    >>> apply_masks(model, masks)
    >>> sparsity_report(model, masks)["weights_remaining"]
    0.5
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import nn

#: Module types whose ``weight`` is prunable (subclasses included, e.g. ``MaskedLinear``).
PRUNABLE_MODULES = (nn.Linear, nn.Conv2d)
#: Where the kept count is enforced: over all prunable weights together, or per layer.
SCOPES = ("global", "layerwise")
#: How masks are structured: single weights; square ``block_size`` tiles of the weight
#: matrix (``imc_kernels.sparse.BlockSparseLinear``); 2 kept in every 4 consecutive weights
#: along the input dimension (``imc_kernels.sparse.SemiStructuredLinear``).
GRANULARITIES = ("element", "block", "2:4")


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The prunable parameters of ``model``: the weights of its Linear and Conv2d layers.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``{name: parameter}`` in ``model.named_parameters()`` order. A weight shared by
        several layers appears once, under its first name.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
        >>> list(prunable_parameters(model))
        ['0.weight', '2.weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    weights = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, PRUNABLE_MODULES) and isinstance(module.weight, nn.Parameter)
    }
    return {name: param for name, param in model.named_parameters() if id(param) in weights}


def check_sparsity(sparsity) -> float:
    """Validate a sparsity (fraction of prunable weights removed) and return it as a float.

    Args:
        sparsity: a real number in ``[0, 1)``.

    Returns:
        ``float(sparsity)``.

    Raises:
        TypeError: not a real number.
        ValueError: outside ``[0, 1)`` (1 would remove every weight) or not finite.

    Example:
        >>> check_sparsity(0.8)
        0.8
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a real number in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(
            f"sparsity must lie in [0, 1) (the fraction of prunable weights removed), got {value}"
        )
    return value


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _kept_count(total: int, sparsity: float) -> int:
    return int(round((1.0 - sparsity) * total))


def _top_mask(flat: torch.Tensor, kept: int) -> torch.Tensor:
    # Stable descending sort: equal scores keep their index order, so ties go to the lower
    # index (deterministic on every device, unlike topk).
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[:kept]] = True
    return keep


def masks_from_scores(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    scope: str = "global",
    granularity: str = "element",
    block_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Masks that keep the highest scores.

    ``granularity="element"`` (the default): ``global`` keeps the top
    ``round((1 - sparsity) * N)`` of all ``N`` scores together; ``layerwise`` keeps the top
    ``round((1 - sparsity) * n_l)`` of each tensor's ``n_l``.

    ``granularity="block"``: each score tensor is read as a matrix ``(shape[0], -1)`` (the
    weight matrix of a Linear layer; ``(out, in * kh * kw)`` for a Conv2d) cut into square
    ``block_size`` tiles, and each tile's score is the *sum* of its scores
    (:func:`block_scores`). Tiles are then ranked as elements are above, globally or per
    layer, and a kept tile keeps all its weights. All tiles hold ``block_size**2`` weights, so
    keeping ``round((1 - sparsity) * n_tiles)`` tiles makes the kept weight fraction the
    closest to ``1 - sparsity`` that whole tiles allow, and ranking by sum or by mean is the
    same. Scores are pooled as given, not as ``|score|``: the magnitude-type scores of the
    package (magnitude, SNIP, IMC) are non-negative, so for them this is the sum of
    ``|score|``, while a signed score (GraSP passes ``-score``, higher is better) keeps its
    meaning, which ``|.|`` would invert. Matrices whose dimensions are not multiples of
    ``block_size`` raise (no padding: the block-sparse kernels need whole tiles too).

    ``granularity="2:4"``: in each group of 4 consecutive weights along a row of the same
    matrix view (the input dimension), the 2 highest scores are kept; ``sparsity`` must be
    0.5 and ``scope`` does not matter (every group keeps exactly half).

    Ties go to the lower index in the flat concatenation (``scores`` order, then row-major;
    tiles in row-major tile order; within a group of 4, the lower column), so the result is
    deterministic.

    Args:
        scores: ``{parameter name: real tensor of the parameter's shape}``; higher is more
            important.
        sparsity: fraction of the scored weights to remove, in ``[0, 1)``.
        scope: ``"global"`` or ``"layerwise"``.
        granularity: one of :data:`GRANULARITIES`.
        block_size: the tile edge, required for ``granularity="block"`` and only then.

    Returns:
        ``{name: bool tensor}`` with the shapes and devices of ``scores``.

    Raises:
        TypeError: ``scores`` is not a mapping of real tensors; a non-int ``block_size``.
        ValueError: empty scores, NaN scores, bad ``sparsity``, ``scope`` or
            ``granularity``; a missing or stray ``block_size``; for ``"block"`` and ``"2:4"``,
            a score with fewer than 2 dimensions or a matrix that the tiles or groups do not
            divide; ``"2:4"`` with a sparsity other than 0.5.

    Example:
        >>> masks_from_scores({"w": torch.tensor([3.0, 1.0, 2.0, 2.0])}, 0.5)
        {'w': tensor([ True, False,  True, False])}
        >>> masks_from_scores({"w": torch.tensor([[1.0, 4.0, 3.0, 2.0]])}, 0.5,
        ...                   granularity="2:4")
        {'w': tensor([[False,  True,  True, False]])}
    """
    sparsity = check_sparsity(sparsity)
    _check_scope(scope)
    check_granularity(granularity, block_size, sparsity=sparsity)
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict name -> tensor, got {type(scores).__name__}")
    if not scores:
        raise ValueError("scores is empty: there is nothing to prune")
    for name, score in scores.items():
        if not isinstance(score, torch.Tensor):
            raise TypeError(f"score {name!r} must be a tensor, got {type(score).__name__}")
        if score.is_complex() or score.dtype == torch.bool:
            raise TypeError(f"score {name!r} must be a real tensor, got dtype {score.dtype}")
        if bool(torch.isnan(score).any()):
            raise ValueError(f"score {name!r} contains NaN; scores must be comparable")

    if granularity == "2:4":
        return {name: _two_four_mask(score, name) for name, score in scores.items()}
    if granularity == "block":
        return _block_masks(scores, sparsity, scope, block_size)
    if scope == "layerwise":
        masks = {}
        for name, score in scores.items():
            kept = _kept_count(score.numel(), sparsity)
            masks[name] = _top_mask(score.detach().reshape(-1), kept).view(score.shape)
        return masks
    first = next(iter(scores.values()))
    # One dtype for the concatenation; float64 holds every fp32/fp16/int32 score exactly.
    dtype = torch.float64 if len({s.dtype for s in scores.values()}) > 1 else first.dtype
    flat = torch.cat([s.detach().reshape(-1).to(first.device, dtype) for s in scores.values()])
    keep = _top_mask(flat, _kept_count(flat.numel(), sparsity))
    masks, offset = {}, 0
    for name, score in scores.items():
        masks[name] = keep[offset : offset + score.numel()].view(score.shape).to(score.device)
        offset += score.numel()
    return masks


def check_granularity(
    granularity: str,
    block_size: int | None = None,
    *,
    sparsity: float | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Check a mask structure before any score is computed.

    :func:`masks_from_scores` runs the same checks; the pruning methods call this first, so
    that a structure the model cannot take fails before a warm-up, a spectrum or a training
    run rather than after it.

    Args:
        granularity: one of :data:`GRANULARITIES`.
        block_size: the tile edge; required for ``"block"`` and only then.
        sparsity: the fraction to prune, when known (``"2:4"`` needs exactly 0.5); None skips
            this check.
        shapes: ``{parameter name: shape}`` of the weights to be masked (e.g. of
            :func:`prunable_parameters`); for ``"block"`` and ``"2:4"`` each must read as a
            matrix ``(shape[0], -1)`` that the tiles or groups of 4 divide. None skips it.

    Raises:
        ValueError: an unknown granularity; a missing or stray ``block_size``, or one below
            1; ``"2:4"`` with a sparsity other than 0.5; a shape the structure does not fit.
        TypeError: a ``block_size`` that is not an int; ``shapes`` that is not a mapping.

    Example:
        >>> check_granularity("block", 2, shapes={"0.weight": (300, 64), "4.weight": (10, 100)})
        >>> check_granularity("2:4", sparsity=0.5, shapes={"0.weight": (300, 64)})
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "block":
        if block_size is None:
            raise ValueError("granularity='block' needs a block_size (the tile edge)")
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size must be an int, got {block_size!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
    elif block_size is not None:
        raise ValueError(
            f"block_size is only used with granularity='block' (got granularity={granularity!r})"
        )
    if granularity == "2:4" and sparsity is not None and sparsity != 0.5:
        raise ValueError(
            "granularity='2:4' keeps exactly 2 of every 4 weights: sparsity must be 0.5, got "
            f"{sparsity}"
        )
    if shapes is not None and not isinstance(shapes, Mapping):
        raise TypeError(
            f"shapes must be a dict parameter name -> shape, got {type(shapes).__name__}"
        )
    if granularity != "element" and shapes is not None:
        for name, shape in shapes.items():
            _check_matrix_shape(tuple(shape), name, granularity, block_size)


def weights_per_unit(granularity: str, block_size: int | None = None) -> int:
    """How many weights a mask of ``granularity`` keeps or prunes together: ``block_size**2``
    for ``"block"`` (a tile), else 1.

    Iterative methods count their schedules in these units, so that every round removes whole
    tiles.

    Example:
        >>> weights_per_unit("block", 4), weights_per_unit("element")
        (16, 1)
    """
    check_granularity(granularity, block_size)
    return block_size**2 if granularity == "block" else 1


def _check_matrix_shape(
    shape: tuple[int, ...], name: str, granularity: str, block_size: int | None
) -> tuple[int, int]:
    """The ``(rows, cols)`` matrix a weight of ``shape`` reads as, if the structure fits it."""
    if len(shape) < 2:
        raise ValueError(
            f"granularity={granularity!r} needs weight matrices (2 or more dimensions); weight "
            f"{name!r} has shape {shape}"
        )
    rows, cols = shape[0], math.prod(shape[1:])
    if granularity == "block" and (rows % block_size or cols % block_size):
        raise ValueError(
            f"granularity='block': weight {name!r} has shape {shape}, a "
            f"({rows}, {cols}) matrix that block_size {block_size} does not divide (remainders "
            f"{rows % block_size} and {cols % block_size}); choose a block size that divides both"
        )
    if granularity == "2:4" and cols % 4:
        raise ValueError(
            f"granularity='2:4': weight {name!r} has shape {shape}, rows of {cols} "
            "weights, not a multiple of 4"
        )
    return rows, cols


def _score_matrix(score: torch.Tensor, name: str, granularity: str, block_size=None):
    rows, cols = _check_matrix_shape(tuple(score.shape), name, granularity, block_size)
    return score.detach().reshape(rows, cols)


def block_scores(score: torch.Tensor, block_size: int, *, name: str = "score") -> torch.Tensor:
    """The pooled score of each ``block_size x block_size`` tile: the sum of its scores.

    The score is read as the matrix ``(shape[0], -1)``; the sum is taken in float64, so the
    pooled scores of equal tiles are equal and ties resolve by position.

    Args:
        score: a real tensor of a weight's shape, 2 or more dimensions.
        block_size: the tile edge.
        name: the parameter's name, for messages.

    Returns:
        float64 ``(rows // block_size, cols // block_size)`` with ``(rows, cols)`` the matrix.

    Raises:
        TypeError: ``score`` is not a tensor.
        ValueError: fewer than 2 dimensions, or a matrix dimension that is not a multiple of
            ``block_size``.

    Example:
        >>> block_scores(torch.arange(8.0).reshape(2, 4), 2)
        tensor([[10., 18.]], dtype=torch.float64)
    """
    if not isinstance(score, torch.Tensor):
        raise TypeError(f"score {name!r} must be a tensor, got {type(score).__name__}")
    check_granularity("block", block_size)
    matrix = _score_matrix(score, name, "block", block_size)
    rows, cols = matrix.shape
    tiles = matrix.to(torch.float64).reshape(
        rows // block_size, block_size, cols // block_size, block_size
    )
    return tiles.sum(dim=(1, 3))


def _expand_tiles(keep: torch.Tensor, block_size: int, shape: torch.Size) -> torch.Tensor:
    return keep.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1).reshape(shape)


def _block_masks(
    scores: Mapping[str, torch.Tensor], sparsity: float, scope: str, block_size: int
) -> dict[str, torch.Tensor]:
    pooled = {name: block_scores(score, block_size, name=name) for name, score in scores.items()}
    if scope == "layerwise":
        return {
            name: _expand_tiles(
                _top_mask(tiles.reshape(-1), _kept_count(tiles.numel(), sparsity)).view(
                    tiles.shape
                ),
                block_size,
                scores[name].shape,
            )
            for name, tiles in pooled.items()
        }
    device = next(iter(scores.values())).device
    flat = torch.cat([tiles.reshape(-1).to(device) for tiles in pooled.values()])
    keep = _top_mask(flat, _kept_count(flat.numel(), sparsity))
    masks, offset = {}, 0
    for name, tiles in pooled.items():
        tile_keep = keep[offset : offset + tiles.numel()].view(tiles.shape)
        masks[name] = _expand_tiles(tile_keep, block_size, scores[name].shape).to(
            scores[name].device
        )
        offset += tiles.numel()
    return masks


def _two_four_mask(score: torch.Tensor, name: str) -> torch.Tensor:
    matrix = _score_matrix(score, name, "2:4")
    rows, cols = matrix.shape
    groups = matrix.reshape(rows, cols // 4, 4)
    # Stable descending sort: of equal scores the lower column is kept.
    top = torch.sort(groups, dim=2, descending=True, stable=True).indices[..., :2]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=score.device)
    keep.scatter_(2, top, True)
    return keep.reshape(score.shape)


def is_two_four(mask: torch.Tensor) -> bool:
    """True when ``mask`` keeps at most 2 of every 4 consecutive weights along its rows.

    The mask is read as the matrix ``(shape[0], -1)``, as ``granularity="2:4"`` builds it; its
    rows must have a multiple of 4 entries (else False).

    Raises:
        TypeError: ``mask`` is not a tensor.

    Example:
        >>> is_two_four(torch.tensor([[True, False, True, False, False, False, True, True]]))
        True
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dim() < 2:
        return False
    matrix = mask.reshape(mask.shape[0], -1)
    if matrix.shape[1] % 4:
        return False
    return bool((matrix.reshape(matrix.shape[0], -1, 4).sum(dim=2) <= 2).all())


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Check that ``masks`` is a valid mask set for ``model``.

    Args:
        model: the network.
        masks: ``{name: bool tensor}``; every name must be a prunable parameter of ``model``
            (prunable parameters left out are kept whole).

    Raises:
        TypeError: not a mapping, a value that is not a bool tensor, a mask on another device.
        ValueError: a name that is not a parameter of ``model``, a parameter that is not
            prunable (a bias or a normalisation layer), or a shape that differs.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> check_masks(model, {"weight": torch.ones(2, 3, dtype=torch.bool)})
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict name -> bool tensor, got {type(masks).__name__}")
    prunable = prunable_parameters(model)
    all_names = {name for name, _ in model.named_parameters()}
    for name, mask in masks.items():
        if name not in prunable:
            if name in all_names:
                raise ValueError(
                    f"mask {name!r}: this parameter is not prunable; only the weights of "
                    f"Linear and Conv2d layers are (prunable: {_preview(prunable)})"
                )
            raise ValueError(
                f"mask {name!r} names no parameter of the model (prunable parameters: "
                f"{_preview(prunable)})"
            )
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask {name!r} must be a tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask {name!r} must have dtype torch.bool, got {mask.dtype}")
        param = prunable[name]
        if mask.shape != param.shape:
            raise ValueError(
                f"mask {name!r} has shape {tuple(mask.shape)} but the parameter has shape "
                f"{tuple(param.shape)}"
            )
        if mask.device != param.device:
            raise TypeError(
                f"mask {name!r} is on {mask.device} but the parameter is on {param.device}"
            )


def _preview(names, limit: int = 6) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "none"


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights of ``model`` in place (``weight *= mask``).

    Pruned entries become exactly ``+0.0`` (also where the weight was NaN or negative). A
    masked layer (one with a bool ``mask`` buffer of the weight's shape, such as
    ``imc_kernels.masked.MaskedLinear``) has its buffer narrowed to the mask as well.

    Args:
        model: the network, modified in place.
        masks: a mask set for ``model`` (see :func:`check_masks`).

    Returns:
        ``model``.

    Raises:
        TypeError, ValueError: as :func:`check_masks`.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> _ = apply_masks(model, {"weight": torch.tensor([[True, False]])})
        >>> model.weight[0, 1].item()
        0.0
    """
    check_masks(model, masks)
    params = prunable_parameters(model)
    by_id = {id(params[name]): mask for name, mask in masks.items()}
    for name, mask in masks.items():
        params[name].masked_fill_(~mask, 0.0)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        buffer = module._buffers.get("mask")
        if weight is None or id(weight) not in by_id or buffer is None:
            continue
        if buffer.dtype == torch.bool and buffer.shape == weight.shape:
            buffer.logical_and_(by_id[id(weight)])
    return model


def dense_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The mask set that keeps every prunable weight.

    Example:
        >>> dense_masks(nn.Linear(3, 2))["weight"].all().item()
        True
    """
    return {
        name: torch.ones(param.shape, dtype=torch.bool, device=param.device)
        for name, param in prunable_parameters(model).items()
    }


def sparsity_report(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> dict:
    """How many prunable weights ``masks`` keeps, per layer and overall.

    Counts come from the masks (not from the weights' values); prunable parameters left out
    of ``masks`` count as fully kept.

    Args:
        model: the network.
        masks: a mask set for ``model``, or None for the dense network.

    Returns:
        ``{"layers": {name: {"total", "kept", "fraction"}}, "total", "kept",
        "weights_remaining", "sparsity"}``; ``fraction`` and ``weights_remaining`` are the
        kept fractions, ``sparsity = 1 - weights_remaining``.

    Raises:
        TypeError, ValueError: as :func:`check_masks`.

    Example:
        >>> model = nn.Linear(4, 1)
        >>> sparsity_report(model, {"weight": torch.tensor([[1, 1, 0, 0]]).bool()})["sparsity"]
        0.5
    """
    masks = {} if masks is None else masks
    check_masks(model, masks)
    layers = {}
    for name, param in prunable_parameters(model).items():
        kept = int(masks[name].sum()) if name in masks else param.numel()
        total = param.numel()
        layers[name] = {"total": total, "kept": kept, "fraction": kept / total if total else 1.0}
    total = sum(layer["total"] for layer in layers.values())
    kept = sum(layer["kept"] for layer in layers.values())
    remaining = kept / total if total else 1.0
    return {
        "layers": layers,
        "total": total,
        "kept": kept,
        "weights_remaining": remaining,
        "sparsity": 1.0 - remaining,
    }
