"""Data-parallel Hessian operator over ``torch.distributed`` (DESIGN section 9).

Every rank holds the same model and its own shard of the batch. With a mean-reduced loss
``L = (1/N) sum_i l_i`` and rank ``r`` holding ``n_r`` of the ``N`` samples, the shard loss is
``L_r = (1/n_r) sum_{i in r} l_i``, so ``L = sum_r (n_r/N) L_r`` and, the Hessian and the GGN
being linear in the loss,

    ``H V = sum_r (n_r / N) H_r V``.

:class:`DistributedHessianOperator` applies the shard's :class:`~imc_kernels.HessianOperator`
to a block, scales the product by ``n_r / N`` (1 for a sum-reduced loss) and sums the blocks
over the ranks in one ``all_reduce``. Every rank receives the same bits, so a solver that runs
*replicated* (the same code on every rank, on the same start block) stays identical on every
rank and calls the operator in lockstep: :func:`imc_kernels.top_eigvecs` and
:func:`imc_kernels.spectral_density` take the operator as they take a ``HessianOperator`` and
use rank 0's seed (:meth:`DistributedHessianOperator.broadcast_seed`). Their start block and
probes are drawn from that seed on the CPU, so broadcasting the seed broadcasts the block.

Three guards keep a replicated solve from going silently wrong or hanging, and all of them
travel in the product's ``all_reduce`` (a few extra elements, one collective per product):

* *agreement*: each rank adds an exact integer fingerprint of the block it was given; a block
  that differs on any rank (a diverged solver, a rank-dependent seed passed to a solver that
  does not broadcast it) makes every rank raise instead of mixing products of different
  vectors. At construction the same check covers the model's parameters and buffers and the
  operator's settings.
* *failure*: a rank whose shard product raises (a non-finite product, an out-of-memory error)
  still joins the collective with a failure flag, re-raises its own exception after it, and
  every other rank raises :class:`RankFailedError` at once.
* *timeout*: a rank that never reaches the collective (it raised elsewhere, or died) is
  caught by the process group's timeout, ``init_process_group(..., timeout=...)``: the other
  ranks raise when it expires (gloo raises at once when a peer's connection closes). The
  operator adds no timeout of its own; gloo's default is 30 minutes, set a shorter one for
  interactive work. With NCCL, set ``TORCH_NCCL_BLOCKING_WAIT=1`` to get an exception rather
  than the watchdog's abort of the process.

The fingerprints are integers spread over float chunks small enough that their sums and the
sums of their squares are exact in the reduce dtype, so each rank can test that *every* rank
sent the same value: ``sum c_r == W c`` and ``sum c_r^2 == W c^2`` force
``sum (c_r - c)^2 = 0``.

Launch with ``torchrun`` (``examples/torchrun_top_eigvecs.py``): gloo on CPUs, NCCL on GPUs
(call ``torch.cuda.set_device(local_rank)`` before building the operator).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from imc_kernels.hvp import HessianOperator
from imc_kernels.hvp._common import (
    CURVATURES,
    ENGINES,
    MODES,
    ParamLayout,
    check_block,
    is_cross_entropy,
    resolve_loss,
    unpack_batch,
)
from imc_kernels.hvp.operator import FlatParameterOperator

__all__ = [
    "REDUCTIONS",
    "DistributedHessianOperator",
    "RankFailedError",
    "broadcast_model",
    "shard_batch",
    "shard_sizes",
]

REDUCTIONS = ("mean", "sum")

# Fingerprints live in [0, 2^31 - 1): the modulus is a prime, so a block that differs from
# another in a single word by d (|d| < 2^32) changes the fingerprint unless d is a multiple
# of it, and every weight below is nonzero modulo it.
_HASH_MODULUS = 2_147_483_647
_HASH_BITS = 31
_CONFIG_BITS = 32  # zlib.crc32
# Words hashed per slice: bounds the int64 temporaries (2^22 words: 32 MiB each) and keeps
# every slice's sum of terms below 2^31 * 2^22 < 2^63.
_HASH_SLICE = 1 << 22


class RankFailedError(RuntimeError):
    """Another rank failed inside a collective step of the operator; its own exception (in its
    log) has the cause. Raised on the ranks that did not fail, so that none of them hangs."""


# ------------------------------------------------------------------------------ sharding
def shard_sizes(n: int, world_size: int) -> list[int]:
    """Shard sizes of an even split of ``n`` samples over ``world_size`` ranks.

    The first ``n % world_size`` ranks hold one sample more (``torch.tensor_split``'s rule);
    with ``n < world_size`` the last ranks hold none.

    Raises:
        ValueError: ``n < 0`` or ``world_size < 1``.

    Example:
        >>> shard_sizes(10, 4)
        [3, 3, 2, 2]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    base, extra = divmod(n, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_batch(
    batch,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    sizes: Sequence[int] | None = None,
    group=None,
):
    """This rank's contiguous shard of ``batch = (inputs, targets)``.

    Every tensor of the batch is sliced along its first dimension (views, no copy); inputs
    may be a tensor, a tuple/list or a dict of tensors, and entries that are not tensors pass
    through unchanged.

    Args:
        batch: ``(inputs, targets)``, the whole batch (the same on every rank).
        rank, world_size: this rank and the number of ranks; both None (the default) takes
            them from ``group`` (the default process group when ``group`` is None).
        sizes: samples per rank, ``world_size`` non-negative integers summing to the batch
            size (uneven shards); default :func:`shard_sizes`, as even as possible.
        group: the process group when ``rank`` and ``world_size`` are None.

    Returns:
        ``(inputs_shard, targets_shard)``, with the structure of ``batch``.

    Raises:
        ValueError: not a pair, a bad ``rank``/``world_size``/``sizes``, or a tensor whose
            first dimension is not the batch size.
        RuntimeError: ``rank``/``world_size`` left None without an initialised process group.

    Example:
        >>> batch = (torch.randn(64, 20), torch.randint(0, 5, (64,)))
        >>> x, y = shard_batch(batch, 1, 2, sizes=[40, 24])
        >>> x.shape, y.shape
        (torch.Size([24, 20]), torch.Size([24]))
    """
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither (then the process group's)")
    if rank is None:
        _, rank, world_size, _ = _process_group(group)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("batch must be a pair (inputs, targets)")
    inputs, targets = batch
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
        raise ValueError("targets must be a tensor whose first dimension is the batch size")
    n = int(targets.shape[0])
    if sizes is None:
        sizes = shard_sizes(n, world_size)
    else:
        sizes = list(sizes)
        if len(sizes) != world_size or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes
        ):
            raise ValueError(
                f"sizes must be {world_size} non-negative integers (one per rank), got {sizes}"
            )
        if sum(sizes) != n:
            raise ValueError(f"sizes {sizes} sum to {sum(sizes)} but the batch has {n} samples")
    start = sum(sizes[:rank])
    stop = start + sizes[rank]

    def cut(value, where: str):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        if value.shape[0] != n:
            raise ValueError(
                f"{where} has {value.shape[0]} rows but the batch has {n} samples; shard_batch "
                "splits every tensor along its first dimension"
            )
        return value[start:stop]

    if isinstance(inputs, dict):
        shard = type(inputs)((key, cut(value, f"inputs[{key!r}]")) for key, value in inputs.items())
    elif isinstance(inputs, (tuple, list)):
        shard = type(inputs)(cut(value, f"inputs[{i}]") for i, value in enumerate(inputs))
    else:
        shard = cut(inputs, "inputs")
    return shard, cut(targets, "targets")


def broadcast_model(model: nn.Module, group=None) -> None:
    """Copy rank 0's parameters and buffers into ``model`` on every rank, in place. Collective.

    The operator needs the same model on every rank and checks it; call this after anything
    that may have run differently per rank (a training step with non-deterministic kernels,
    an unseeded initialisation).

    Raises:
        RuntimeError: ``torch.distributed`` unavailable or not initialised.

    Example:
        >>> model = build_model("lenet300100")  # unseeded: different on each rank
        >>> broadcast_model(model)              # now rank 0's everywhere
    """
    group, _, _, root = _process_group(group)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=root, group=group)


# ------------------------------------------------------------------------------ operator
class DistributedHessianOperator(FlatParameterOperator):
    """The full-batch Hessian (or GGN) as a sum of per-rank shard operators.

    Rank ``r`` builds a :class:`~imc_kernels.HessianOperator` on its shard; ``H @ V`` applies
    it, scales by the rank's share of the loss and sums over the ranks in one ``all_reduce``,
    so every rank returns the full-batch product (to fp32 rounding) with the same bits. The
    interface is :class:`~imc_kernels.HessianOperator`'s, so :func:`imc_kernels.top_eigvecs`
    and :func:`imc_kernels.spectral_density` take it in place of one. Every rank must call
    every method that communicates (construction, products, :meth:`broadcast_seed`) in the
    same order: the solvers do, running replicated.

    Args:
        model: the network, identical on every rank (parameters and buffers are checked).
        loss_fn: ``loss_fn(output, targets) -> scalar``, as for ``HessianOperator``; None
            means cross-entropy for integer targets and MSE for float targets.
        batch: this rank's shard ``(inputs, targets)`` on the model's device (see
            :func:`shard_batch`; shards may be uneven or empty), or with ``full_batch`` the
            whole batch, the same on every rank.
        curvature, engine, mode, check_finite: as for ``HessianOperator``.
        group: the process group; None for the default one. Its backend must handle tensors
            on the model's device (gloo: CPU, NCCL: CUDA).
        full_batch: ``batch`` is the whole batch and the operator keeps this rank's even
            shard of it (:func:`shard_batch`).
        reduction: how ``loss_fn`` reduces over samples: ``"mean"`` weights the rank's
            product by ``n_r / N``, ``"sum"`` adds the products. None takes the loss
            module's ``reduction`` attribute when it has one, else ``"mean"``.
        n_samples: this rank's weight in the mean, default its sample count (for a
            cross-entropy module: the targets that are not ``ignore_index``, weighted by its
            class ``weight`` if any). Pass e.g. the token count for a token-averaged loss.
        reduce_dtype: dtype of the ``all_reduce``. float64 (the default) sums the fp32 shard
            products exactly enough that the result does not depend on the backend's
            summation order (gloo's ring or bcube, NCCL's ring or tree, which change with
            the world size and topology): one rounding to the model dtype at the end. float32
            halves the traffic.

    Attributes:
        local: this rank's shard ``HessianOperator`` (None for an empty shard).
        rank, world_size: this rank in ``group`` and the group's size.
        n_samples, total_samples: this rank's weight count and the sum over ranks.
        weight: the factor of this rank's product (``n_samples / total_samples`` or 1).
        loss: the full-batch loss (a 0-dim tensor in the model's dtype).
        n_products: Hessian-vector products applied (columns), as for ``HessianOperator``.

    Raises:
        RuntimeError: ``torch.distributed`` unavailable or not initialised.
        ValueError: bad arguments; a model, dtype or settings that differ across ranks; a
            batch empty on every rank.
        RankFailedError: another rank failed to build its shard's operator.
        TypeError, FloatingPointError: as ``HessianOperator`` on this rank's shard.

    Example:
        >>> dist.init_process_group("gloo")  # under torchrun
        >>> H = DistributedHessianOperator(model, None, batch, full_batch=True)
        >>> res = imc_kernels.top_eigvecs(H, None, 8)  # the same result on every rank
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable | None = None,
        batch=None,
        *,
        curvature: str = "hessian",
        engine: str = "auto",
        mode: str = "eval",
        check_finite: bool = True,
        group=None,
        full_batch: bool = False,
        reduction: str | None = None,
        n_samples: float | None = None,
        reduce_dtype: torch.dtype = torch.float64,
    ):
        # Argument errors first: they are the same on every rank, so every rank raises them
        # before any collective.
        self.group, self.rank, self.world_size, self._root = _process_group(group)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if batch is None:
            raise ValueError("batch is required: a pair (inputs, targets)")
        if reduce_dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"reduce_dtype must be torch.float32 or torch.float64, got {reduce_dtype}"
            )
        reduction = _resolve_reduction(reduction, loss_fn)
        if n_samples is not None and (
            isinstance(n_samples, bool)
            or not isinstance(n_samples, (int, float))
            or not math.isfinite(n_samples)
            or n_samples < 0
        ):
            raise ValueError(f"n_samples must be a finite number >= 0, got {n_samples!r}")
        self.model = model
        self.layout = ParamLayout.of(model)
        self.curvature = curvature
        self.mode = mode
        self.check_finite = check_finite
        self.reduction = reduction
        self.reduce_dtype = reduce_dtype
        self.n_products = 0
        # Agreement chunks: W * (2^bits - 1)^2 must be exact in the reduce dtype.
        self._bits = _chunk_bits(reduce_dtype, self.world_size)
        if self._bits < 1:
            raise ValueError(
                f"reduce_dtype={reduce_dtype} cannot carry the agreement check over "
                f"{self.world_size} ranks exactly; use torch.float64"
            )
        if full_batch:
            batch = shard_batch(batch, self.rank, self.world_size)

        # Everything that can fail on one rank alone runs inside the try, and the failure is
        # announced in the collective instead of leaving the other ranks waiting.
        error: Exception | None = None
        self.local: HessianOperator | None = None
        count, loss = 0.0, 0.0
        try:
            inputs, targets = unpack_batch(batch, self.layout)
            self.loss_fn = resolve_loss(loss_fn, targets)
            count = float(_sample_count(self.loss_fn, targets) if n_samples is None else n_samples)
            if count > 0:
                self.local = HessianOperator(
                    model,
                    loss_fn,
                    (inputs, targets),
                    curvature=curvature,
                    engine=engine,
                    mode=mode,
                    check_finite=check_finite,
                )
                loss = float(self.local.loss)
            model_print = _model_fingerprint(model)
        except Exception as exc:  # re-raised below, after the collective
            error = exc
            model_print = torch.zeros((), dtype=torch.int64, device=self.device)
        config = (
            f"dim={self.dim};dtype={self.dtype};curvature={curvature};mode={mode};"
            f"engine={engine};reduction={reduction};reduce_dtype={reduce_dtype}"
        )
        agreed_values = torch.stack(
            [model_print, torch.tensor(zlib.crc32(config.encode()), device=self.device)]
        )
        init_bits = _chunk_bits(torch.float64, self.world_size)
        slots = _agreement_slots(agreed_values, init_bits, _CONFIG_BITS)
        header = torch.tensor(
            [
                float(error is not None),
                float(self.rank + 1 if error is not None else 0),
                count,
                count * loss,
                loss,
            ],
            dtype=torch.float64,
            device=self.device,
        )
        message = torch.cat([header, slots.to(torch.float64)])
        dist.all_reduce(message, group=self.group)
        agreed = _all_agree(message[header.numel() :], slots, self.world_size)
        summed = torch.cat([message[: header.numel()], agreed.to(torch.float64).view(1)]).tolist()
        n_failed, failed_rank, total, weighted_loss, loss_sum, all_agree = summed
        if error is not None:
            raise error
        if n_failed:
            raise RankFailedError(
                _failure_message(
                    n_failed, failed_rank, self.world_size, "build its shard's operator"
                )
            )
        if not all_agree:
            raise ValueError(
                "the ranks do not hold the same model or settings: a replicated solver needs "
                "the same parameters and buffers, dtype, curvature, mode, engine, reduction "
                "and reduce_dtype on every rank (imc_kernels.distributed.broadcast_model "
                "copies rank 0's weights to every rank)"
            )
        if total <= 0:
            raise ValueError(
                "the batch is empty on every rank (no samples, or every target ignored)"
            )
        self.n_samples = count
        self.total_samples = total
        if reduction == "mean":
            self.weight = count / total
            full_loss = weighted_loss / total
        else:
            self.weight = 1.0
            full_loss = loss_sum
        self.loss = torch.tensor(full_loss, dtype=self.dtype, device=self.device)

    # --------------------------------------------------------------------------- the layout
    @property
    def engine(self) -> str:
        """The shard operator's engine (``"none"`` on a rank with an empty shard)."""
        return self.local.engine if self.local is not None else "none"

    @property
    def engine_reason(self) -> str:
        return self.local.engine_reason if self.local is not None else "empty shard"

    # --------------------------------------------------------------------------- products
    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """``H @ V`` of the full batch for a block ``V`` of shape ``(dim, b)``; returns
        ``(dim, b)`` in the model's dtype, the same bits on every rank. Collective.

        Raises:
            ValueError: wrong shape. TypeError: wrong dtype or device.
            RuntimeError: the ranks were given different blocks.
            RankFailedError: another rank's shard product failed.
            FloatingPointError: a non-finite product (with ``check_finite``).
        """
        block, was_vector = check_block(block, self.layout)
        b = block.shape[1]
        if b == 0:
            return block.new_zeros(block.shape)
        n = self.dim * b
        n_slots = 2 * _n_chunks(_HASH_BITS, self._bits)
        message = torch.empty(n + 2 + n_slots, dtype=self.reduce_dtype, device=self.device)
        product = message[:n].view(self.dim, b)
        error: Exception | None = None
        try:
            if self.local is None:
                product.zero_()
            else:
                product.copy_(self.local.matmat(block))
                if self.weight != 1.0:
                    product.mul_(self.weight)
        except Exception as exc:  # re-raised below, after the collective
            error = exc
            product.zero_()
        message[n] = float(error is not None)
        message[n + 1] = float(self.rank + 1 if error is not None else 0)
        slots = _agreement_slots(_fingerprint(block).view(1), self._bits, _HASH_BITS)
        message[n + 2 :] = slots.to(self.reduce_dtype)
        dist.all_reduce(message, group=self.group)
        agreed = _all_agree(message[n + 2 :], slots, self.world_size)
        out = product if self.reduce_dtype == self.dtype else product.to(self.dtype)
        finite = (
            torch.isfinite(out.sum(dtype=torch.float64))
            if self.check_finite
            else torch.ones((), dtype=torch.bool, device=self.device)
        )
        status = torch.stack(
            [message[n], message[n + 1], agreed.to(message.dtype), finite.to(message.dtype)]
        )
        n_failed, failed_rank, all_agree, all_finite = status.tolist()  # one host sync
        if error is not None:
            raise error
        if n_failed:
            raise RankFailedError(
                _failure_message(
                    n_failed, failed_rank, self.world_size, "apply its shard's operator"
                )
            )
        if not all_agree:
            raise RuntimeError(
                "the ranks applied the operator to different blocks: a replicated solver has "
                "diverged (different seeds, or results that differ bitwise across ranks), so "
                "the summed product would mix unrelated vectors; give every rank the same "
                "seed and the same hardware and thread settings"
            )
        if not all_finite:
            raise FloatingPointError(
                "the all-reduced Hessian-vector product is not finite: the sum over the "
                f"ranks overflowed {self.dtype}"
            )
        self.n_products += b
        return out[:, 0] if was_vector else out

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (NumPy in, NumPy out, float64).

        Each application is collective: run the SciPy solver replicated with the same
        arguments on every rank, a start vector ``v0`` included (ARPACK otherwise draws its
        own, differently on each rank, and the agreement check raises).
        """
        return super().to_scipy()

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's ``seed``, on every rank. Collective.

        The solvers call it before drawing their start block, so a replicated solve starts
        from rank 0's block even when the ranks were given different seeds.
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        value = torch.tensor([seed], dtype=torch.int64, device=self.device)
        dist.broadcast(value, src=self._root, group=self.group)
        return int(value.item())

    def __repr__(self) -> str:
        return (
            f"DistributedHessianOperator(dim={self.dim}, rank={self.rank}/{self.world_size}, "
            f"n_samples={self.n_samples:g}/{self.total_samples:g}, reduction={self.reduction!r}, "
            f"curvature={self.curvature!r}, engine={self.engine!r}, device={self.device}, "
            f"dtype={self.dtype}, reduce_dtype={self.reduce_dtype}, "
            f"n_products={self.n_products})"
        )


# ------------------------------------------------------------------------------ helpers
def _process_group(group):
    """``(group, rank, world_size, global rank of the group's rank 0)``, or a clear error."""
    if not dist.is_available():
        raise RuntimeError(
            "torch.distributed is not available in this PyTorch build; the data-parallel "
            "operator needs it"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "the torch.distributed process group is not initialised: call "
            "torch.distributed.init_process_group(backend='gloo' on CPUs or 'nccl' on GPUs) "
            "first, e.g. in a script launched with torchrun"
        )
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return group, rank, dist.get_world_size(group), dist.get_global_rank(group, 0)


def _resolve_reduction(reduction: str | None, loss_fn) -> str:
    if reduction is None:
        reduction = (
            getattr(loss_fn, "reduction", "mean") if isinstance(loss_fn, nn.Module) else "mean"
        )
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"the loss reduces with reduction={reduction!r}; the operator needs a scalar "
                "loss, a mean or a sum over samples"
            )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _sample_count(loss_fn, targets: torch.Tensor) -> float:
    """The denominator of this shard's mean: what the loss averages over."""
    if is_cross_entropy(loss_fn) and not targets.dtype.is_floating_point:
        # nn.CrossEntropyLoss averages over the targets that are not ignore_index, each
        # weighted by its class weight when the loss has one.
        valid = targets != getattr(loss_fn, "ignore_index", -100)
        class_weight = getattr(loss_fn, "weight", None)
        if class_weight is not None:
            return float(class_weight[targets[valid]].sum())
        return float(valid.sum())
    return float(targets.shape[0]) if targets.dim() else 0.0


def _chunk_bits(dtype: torch.dtype, world_size: int) -> int:
    """Bits per agreement chunk: ``world_size * (2^bits)^2 <= 2^mantissa`` keeps the sums of
    the chunks and of their squares exact integers in ``dtype``."""
    mantissa = {torch.float32: 24, torch.float64: 53}[dtype]  # significand bits
    return (mantissa - world_size.bit_length()) // 2


def _n_chunks(value_bits: int, bits: int) -> int:
    return -(-value_bits // bits)


def _agreement_slots(values: torch.Tensor, bits: int, value_bits: int) -> torch.Tensor:
    """Non-negative int64 ``values`` (each below ``2^value_bits``) as ``bits``-bit chunks,
    followed by the chunks' squares: ``(2 * len(values) * n_chunks,)`` int64."""
    shifts = torch.arange(_n_chunks(value_bits, bits), device=values.device) * bits
    chunks = (values.view(-1, 1) >> shifts) & ((1 << bits) - 1)
    chunks = chunks.reshape(-1)
    return torch.cat([chunks, chunks * chunks])


def _all_agree(reduced: torch.Tensor, slots: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank sent ``slots`` (a device bool): exact sums of chunks and squares."""
    return (reduced == (slots * world_size).to(reduced.dtype)).all()


def _fingerprint(tensor: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """A 31-bit hash of ``tensor``'s bits, an int64 0-dim tensor on its device (no sync).

    ``sum_i word_i * w_i mod p`` over the tensor's 32-bit (or 16/8-bit) words, with
    position-dependent odd weights ``w_i < 2^17``: exact integer arithmetic, so the same bits
    give the same hash whatever the reduction order.
    """
    flat = tensor.detach().contiguous().view(-1)
    size = flat.element_size()
    word_dtype = {8: torch.int32, 4: torch.int32, 2: torch.int16, 1: torch.int8}[size]
    words = flat.view(word_dtype)
    total = torch.zeros((), dtype=torch.int64, device=tensor.device)
    for start in range(0, words.numel(), _HASH_SLICE):
        piece = words[start : start + _HASH_SLICE].to(torch.int64)
        position = torch.arange(start, start + piece.numel(), device=tensor.device)
        weight = ((position * 40503 + salt) % 65521) * 2 + 1
        # |word * weight| < 2^31 * 2^17; reduced below p before the sum, so the slice sum
        # stays below 2^31 * 2^22.
        total = (total + torch.remainder(piece * weight, _HASH_MODULUS).sum()) % _HASH_MODULUS
    return total


def _model_fingerprint(model: nn.Module) -> torch.Tensor:
    """Hash of every trainable parameter and floating buffer, in order."""
    tensors = [p for p in model.parameters() if p.requires_grad]
    tensors += [b for b in model.buffers() if b.is_floating_point()]
    device = tensors[0].device
    total = torch.zeros((), dtype=torch.int64, device=device)
    for index, tensor in enumerate(tensors):
        total = (total * 40503 + _fingerprint(tensor, salt=index).to(device)) % _HASH_MODULUS
    return total


def _failure_message(n_failed: float, failed_rank: float, world_size: int, what: str) -> str:
    if int(n_failed) == 1:
        who = f"rank {int(failed_rank) - 1} of {world_size}"
    else:
        who = f"{int(n_failed)} of {world_size} ranks"
    return (
        f"{who} failed to {what} (its own exception, in its log, has the cause); this rank "
        "stops with it rather than wait on a collective that would not come"
    )
