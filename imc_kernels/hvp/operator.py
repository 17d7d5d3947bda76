"""``HessianOperator``: the loss Hessian (or GGN) of a model on a batch, as a linear operator."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from imc_kernels.hvp._common import (
    CURVATURES,
    ENGINES,
    MODES,
    ParamLayout,
    call_model,
    check_batch_not_empty,
    check_block,
    check_finite_loss,
    check_finite_product,
    check_loss,
    check_targets,
    prepare_targets,
    resolve_loss,
    stochastic_modules,
    strict_fp32,
    unpack_batch,
)
from imc_kernels.hvp.cuda_graph import CudaGraphBlockProduct, cuda_graph_unsupported_reason
from imc_kernels.hvp.double_backward import DoubleBackwardEngine
from imc_kernels.hvp.func_engine import FuncEngine
from imc_kernels.hvp.fused import FusedEngine, fused_unsupported_reason

logger = logging.getLogger("imc_kernels")

_FUSED_REASON = "every module and the loss have fused rules"
_ENGINES = {"fused": FusedEngine, "func": FuncEngine, "double_backward": DoubleBackwardEngine}


class FlatParameterOperator:
    """What an operator on flat parameter vectors derives from its ``layout`` and its
    ``matmat``: ``dim``, ``shape``, ``dtype``, ``device``, ``matvec``, ``@``, ``as_params``
    and ``to_scipy`` (shared by :class:`HessianOperator` and the data-parallel operator of
    :mod:`imc_kernels.distributed`)."""

    layout: ParamLayout

    def matmat(self, block: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dim(self) -> int:
        """Number of trainable parameters (the operator is ``dim x dim``)."""
        return self.layout.dim

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.layout.device

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for ``v`` of shape ``(dim,)``."""
        if not isinstance(vector, torch.Tensor) or vector.dim() != 1:
            shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector)
            raise ValueError(f"matvec takes a vector of shape ({self.dim},), got {shape}")
        return self.matmat(vector)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matmat(other)

    def as_params(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector as ``{parameter name: tensor shaped like the parameter}``."""
        check_block(vector, self.layout)
        return self.layout.unflatten(vector)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (NumPy in, NumPy out, float64).

        Its products raise TypeError for complex input: the operator is real, and casting
        would drop the imaginary part (apply it to ``x.real`` and ``x.imag`` separately).
        """
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def apply(x):
            x = np.asarray(x)
            if np.iscomplexobj(x):
                raise TypeError(
                    f"the operator is real and takes real vectors, got {x.dtype}; apply it to "
                    "x.real and x.imag separately (H x = H x.real + 1j H x.imag)"
                )
            block = torch.as_tensor(x.reshape(self.dim, -1), dtype=self.dtype, device=self.device)
            out = self.matmat(block).to(torch.float64).cpu().numpy()
            return out.reshape(x.shape)

        return LinearOperator(
            (self.dim, self.dim),
            matvec=apply,
            matmat=apply,
            rmatvec=apply,
            rmatmat=apply,
            dtype=np.float64,
        )


class HessianOperator(FlatParameterOperator):
    """The Hessian (or Gauss-Newton matrix) of ``loss_fn(model(inputs), targets)``.

    Products take flat vectors in ``model.parameters()`` order (trainable parameters only):
    ``H @ v`` with ``v`` of shape ``(dim,)`` or a block ``(dim, b)``. The batch is fixed, so
    the engines compute what does not depend on ``v`` once, when the operator is made.

    Args:
        model: the network; its parameters define the Hessian's coordinates.
        loss_fn: ``loss_fn(output, targets) -> scalar``; None means cross-entropy for integer
            targets and MSE for float targets.
        batch: ``(inputs, targets)`` on the model's device, at least one sample. Integer
            class indices of cross-entropy narrower than int64 are cast to int64 (what
            ``F.cross_entropy`` takes), the same for every engine.
        curvature: ``"hessian"`` or ``"ggn"`` (``J^T H_loss J``, positive semi-definite when
            the loss is convex in the output).
        engine: ``"fused"`` (per-layer rules, block GEMMs, fused kernels), ``"func"``
            (``torch.func`` forward-over-reverse, any model), ``"double_backward"``
            (reverse-over-reverse, Hessian only), or ``"auto"``: fused when every module and
            the loss are supported, else func, and for Hessian products double_backward
            when func's first product finds an op without a forward-mode rule (such as
            ``huber_loss``). ``engine_reason`` says why. Models with
            forward hooks, subclasses with their own ``forward`` or reparametrized weights
            are not supported by fused (its rules would skip that code).
        mode: ``"eval"`` (default) evaluates the model in eval mode (dropout off, BatchNorm
            running statistics) and restores its mode afterwards; ``"train"`` keeps train
            mode, where products are neither deterministic (dropout) nor row-separable
            (BatchNorm batch statistics).
        check_finite: raise ``FloatingPointError`` when a product is not finite. The check
            reads one scalar on the host, so every product waits for the device; pass False
            for products that return before the device is done (with ``cuda_graph``: a
            replay with no host synchronisation).
        cuda_graph: capture the fused engine's block product in a CUDA graph, once per block
            width, and replay it (:mod:`imc_kernels.hvp.cuda_graph`): for the launch-bound
            products of small models. Needs a CUDA model and the fused engine (``"fused"``,
            or ``"auto"`` when it picks fused). The first product of each width warms up and
            captures; each graph holds a ``(dim, b)`` input and output and the scratch of one
            product until :meth:`reset_graphs`.

    Raises:
        ValueError: bad arguments, a batch that does not fit the model, an empty batch,
            cross-entropy targets out of range, of the wrong shape or all ``ignore_index``,
            a ``loss_fn`` that does not return a scalar, ``engine="fused"`` on a model it
            cannot run exactly (hooks, custom forwards, reparametrized weights: the message
            names the module), ``cuda_graph=True`` on a CPU model, with another engine, or
            in train mode with Dropout/BatchNorm.
        TypeError: tensors of the wrong type, dtype or device; a model that does not return
            one tensor.
        FloatingPointError: the loss is not finite.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
        >>> H = HessianOperator(model, None, batch)
        >>> H.dim, H.engine
        (23, 'fused')
        >>> (H @ torch.randn(H.dim, 5)).shape
        torch.Size([23, 5])
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
        cuda_graph: bool = False,
    ):
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
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        self.model = model
        self.layout = ParamLayout.of(model)
        if cuda_graph:
            reason = cuda_graph_unsupported_reason(self.layout.device, engine, mode, model)
            if reason:
                raise ValueError(f"cuda_graph=True: {reason}")
        self.inputs, targets = unpack_batch(batch, self.layout)
        check_batch_not_empty(targets)
        self.loss_fn = resolve_loss(loss_fn, targets)
        self.targets = prepare_targets(self.loss_fn, targets)
        self.curvature = curvature
        self.mode = mode
        self.check_finite = check_finite
        self.cuda_graph = cuda_graph
        self.graphs: CudaGraphBlockProduct | None = None
        self.n_products = 0
        self._warn_mode(model, mode)

        with self._context():
            fused = self._fused_first(engine, curvature)
            if fused is not None:
                self.loss = fused.loss.detach()
                check_finite_loss(self.loss)
                self.engine, self.engine_reason = "fused", _FUSED_REASON
                self._engine = fused
            else:
                output = self._primal_output()
                check_targets(output, self.targets, self.loss_fn)
                loss = self.loss_fn(output, self.targets)
                check_loss(loss)
                self.loss = loss.detach()
                check_finite_loss(self.loss)
                self.engine, self.engine_reason = self._choose_engine(engine, output.shape)
                self._engine = _ENGINES[self.engine](
                    model, self.layout, self.loss_fn, self.inputs, self.targets, curvature
                )
        # auto's choice of func rests on the modules; an op inside them may still lack a
        # forward-mode rule, which only the first product finds out.
        self._may_fall_back = engine == "auto" and self.engine == "func" and curvature == "hessian"
        if cuda_graph:
            if self.engine != "fused":  # engine="auto" picked another one
                raise ValueError(
                    "cuda_graph=True: CUDA graphs capture the fused engine's block product; "
                    f"engine='auto' chose {self.engine!r} ({self.engine_reason})"
                )
            self.graphs = CudaGraphBlockProduct(self._block_product, self.device, self._context)
        logger.info("HessianOperator: engine %s (%s)", self.engine, self.engine_reason)

    # ----------------------------------------------------------------------------- setup
    @staticmethod
    def _warn_mode(model: nn.Module, mode: str) -> None:
        if not model.training:
            return
        names = stochastic_modules(model)
        if not names:
            return
        if mode == "eval":
            warnings.warn(
                f"the model is in train mode with {', '.join(names)}; HessianOperator "
                "evaluates it in eval mode (dropout off, BatchNorm running statistics) so "
                "products are deterministic; pass mode='train' to keep train mode",
                stacklevel=3,
            )
        else:
            warnings.warn(
                f"mode='train' with {', '.join(names)}: the operator is not deterministic "
                "(dropout) and BatchNorm couples the rows of the batch",
                stacklevel=3,
            )

    def _fused_first(self, engine: str, curvature: str) -> FusedEngine | None:
        """The fused engine, built before anything else when the modules allow it.

        Its primal forward then serves the operator's own checks (targets, loss, finiteness),
        so the model runs forward once, not twice (the separate forward took ~6 ms of a 0.27 s
        LeNet-300-100 solve at k = 10). None when the fused engine cannot run or its
        construction fails: the caller then runs the model's own forward, whose checks give
        the errors.
        """
        if engine not in ("auto", "fused"):
            return None
        reason = fused_unsupported_reason(
            self.model, self.loss_fn, self.inputs, self.targets, self.mode, None
        )
        if reason is not None:
            return None
        try:
            return FusedEngine(
                self.model, self.layout, self.loss_fn, self.inputs, self.targets, curvature
            )
        except (RuntimeError, ValueError, TypeError, IndexError):
            return None

    def _primal_output(self) -> torch.Tensor:
        shapes = [tuple(t.shape) for t in _tensors(self.inputs)]
        try:
            with torch.no_grad():
                return call_model(self.model, self.inputs)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise ValueError(
                f"the model's forward failed on batch inputs of shape {shapes}: {exc}"
            ) from exc

    def _choose_engine(self, engine: str, output_shape) -> tuple[str, str]:
        if engine in ("auto", "fused"):
            reason = fused_unsupported_reason(
                self.model, self.loss_fn, self.inputs, self.targets, self.mode, output_shape
            )
            if reason is None:
                return "fused", _FUSED_REASON
            if engine == "fused":
                raise ValueError(f"engine='fused' cannot run this model: {reason}")
            if self.mode == "train" and stochastic_modules(self.model):
                # Train-mode Dropout draws random masks and BatchNorm writes its running
                # statistics, neither of which torch.func transforms allow; the gradient graph
                # of double_backward is built once, so all products share one dropout mask.
                if self.curvature == "ggn":
                    raise ValueError(
                        "curvature='ggn' cannot run mode='train' with Dropout/BatchNorm: the "
                        "fused engine needs eval mode, torch.func (engine='func') forbids "
                        "train-mode Dropout/BatchNorm, and engine='double_backward' computes "
                        "Hessian products only; use mode='eval' or curvature='hessian'"
                    )
                return "double_backward", f"mode='train' with Dropout/BatchNorm ({reason})"
            return "func", f"fused engine unavailable: {reason}"
        if engine == "func" and self.mode == "train" and stochastic_modules(self.model):
            raise ValueError(
                "engine='func' cannot run mode='train' with Dropout/BatchNorm (torch.func "
                "forbids random masks and running-statistic updates inside its transforms); "
                "use engine='double_backward' or mode='eval'"
            )
        return engine, "requested"

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with strict_fp32(), _model_mode(self.model, self.mode):
            yield

    # --------------------------------------------------------------------------- products
    def matmat(self, block: torch.Tensor, *, copy: bool = True) -> torch.Tensor:
        """``H @ V`` for a block ``V`` of shape ``(dim, b)``; returns ``(dim, b)``.

        Args:
            block: ``(dim, b)`` (or ``(dim,)``).
            copy: with ``cuda_graph``, False returns the graph's static output itself instead
                of a copy: no device copy, but the next product of the same width overwrites
                it. Without ``cuda_graph`` every result is a new tensor either way.

        Raises:
            ValueError: wrong shape. TypeError: wrong dtype or device.
            FloatingPointError: a non-finite product (with ``check_finite``).
            RuntimeError: with ``cuda_graph``, the capture failed.
        """
        block, was_vector = check_block(block, self.layout)
        b = block.shape[1]
        if b == 0:
            return block.new_zeros(block.shape)
        if self.graphs is not None:
            out = self.graphs(block, copy=copy)
        else:
            with self._context():
                out = self._block_product(block)
        # After the product, outside any graph: the check synchronises with the device.
        if self.check_finite:
            check_finite_product(out, self.engine)
        self.n_products += b
        return out[:, 0] if was_vector else out

    def _block_product(self, block: torch.Tensor) -> torch.Tensor:
        """``(dim, b) -> (dim, b)``: the work of one product, all a CUDA graph captures."""
        tangents = self.layout.split_block(block)
        if block.shape[1] == 1 and isinstance(self._engine, FusedEngine):
            # A single vector: the fused rules may write products straight into the output.
            out = torch.empty(self.dim, 1, dtype=block.dtype, device=block.device)
            views = self.layout.parameter_views(out[:, 0])
            return self.layout.join_block(self._engine.matmat(tangents, views), 1, out=out)
        return self.layout.join_block(self._engine_matmat(tangents), block.shape[1])

    def _engine_matmat(self, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        try:
            return self._engine.matmat(tangents)
        except NotImplementedError as exc:
            if not self._may_fall_back:
                raise
            self._may_fall_back = False
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._engine = DoubleBackwardEngine(
                self.model, self.layout, self.loss_fn, self.inputs, self.targets, "hessian"
            )
            self.engine = "double_backward"
            self.engine_reason = (
                f"{self.engine_reason}; then func's first product failed ({first_line}), so "
                "double_backward"
            )
            logger.info("HessianOperator: engine %s (%s)", self.engine, self.engine_reason)
            return self._engine.matmat(tangents)

    def reset_graphs(self) -> None:
        """Free the CUDA graphs, their buffers and memory pools; the next product of each
        width captures again. Nothing to do without ``cuda_graph``."""
        if self.graphs is not None:
            self.graphs.reset()

    def __repr__(self) -> str:
        return (
            f"HessianOperator(dim={self.dim}, curvature={self.curvature!r}, "
            f"engine={self.engine!r} ({self.engine_reason}), device={self.device}, "
            f"dtype={self.dtype}, n_products={self.n_products})"
        )


def hvp(model: nn.Module, loss_fn: Callable | None, batch, v: torch.Tensor, **kwargs):
    """One-call ``H @ v``: builds a :class:`HessianOperator` and applies it.

    Args:
        model, loss_fn, batch: as for :class:`HessianOperator`.
        v: ``(dim,)`` or ``(dim, b)``.
        **kwargs: ``curvature``, ``engine``, ``mode``, ``check_finite`` (``cuda_graph`` too,
            though one product gains nothing from a graph).

    Returns:
        ``H @ v``, shaped like ``v``.
    """
    return HessianOperator(model, loss_fn, batch, **kwargs).matmat(v)


@contextlib.contextmanager
def _model_mode(model: nn.Module, mode: str) -> Iterator[None]:
    if mode == "train":
        # Train-mode forwards update BatchNorm running statistics; the operator observes the
        # model and leaves its buffers as they were.
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        try:
            yield
        finally:
            # Through .data: the double_backward graph records the buffers' versions, and in
            # train mode BatchNorm only writes its running statistics, never reads them.
            for buffer, saved in buffers:
                buffer.data.copy_(saved)
        return
    if not any(m.training for m in model.modules()):
        yield
        return
    previous = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in previous:
            module.training = training


def _tensors(inputs):
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, dict):
        inputs = list(inputs.values())
    return [t for t in inputs if isinstance(t, torch.Tensor)]
