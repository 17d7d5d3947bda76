"""CUDA-graph block products: the fused engine's ``H @ V`` captured once per block width.

For the project's models a block product is about a hundred small kernels (GEMMs of a few
hundred columns, the fused elementwise kernels, the loss kernel) and the host's launch work
is of the order of the device's (kernel_design.md sections 1 and 2.4): the product is
launch-bound. A CUDA graph launches the whole product at once. The first product of a given
block width ``b`` (and dtype) runs a few eager products on a side stream, then captures one
into a ``torch.cuda.CUDAGraph`` with a static ``(dim, b)`` input and output; later products
of that width copy the block into the static input, replay the graph and return a copy of
the static output.

What is captured is everything between the block and its product: the split of the block
into per-parameter tangents, the fused engine's tangent forward and backward over the
primal cached when the operator was made, and the join into ``(dim, b)``. What stays outside:
input validation, the copy into the static input, the finiteness check, the copy of the
output and ``n_products``. The captured work obeys the rules of stream capture, which
``tests/hvp/test_cuda_graph.py`` checks on CPU by tracing the product's ATen calls:

* no host reads of device data (``.item()``, ``bool(tensor)``, boolean-mask indexing,
  ``nonzero``): they synchronise the stream, which capture forbids. The operator's
  finiteness check reads one scalar on the host, so it runs on the replayed output;
* no Python branch on device values, and the same ops on the same shapes for every block
  of a width: the graph replays the kernels and the allocations (from its private memory
  pool) of the captured product, whatever the block holds;
* kernels launch on the current stream: cuBLAS, cuDNN and the Triton launchers do.

The graph bakes in device addresses: the model's parameters (which the operator's layout
keeps alive), the cached primal and the static buffers. Like the eager fused engine, it
describes the model and batch the operator was made with; make a new operator after
changing either.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from imc_kernels.hvp._common import STOCHASTIC_MODULES

# Eager products on a side stream before the capture, as the PyTorch CUDA-graph docs do
# (three): they compile and load the Triton kernels for this width (their integer arguments
# are specialised on value 1 and on divisibility by 16, so a new width may mean a new
# binary), create the cuBLAS/cuDNN handles and workspaces of the stream, and pick the
# algorithms, none of which may happen during capture.
WARMUP_PRODUCTS = 3


def cuda_graph_unsupported_reason(
    device: torch.device, engine: str, mode: str, model: nn.Module
) -> str | None:
    """Why ``cuda_graph=True`` cannot run; None when it can.

    Called with the requested engine before the operator builds one; ``"auto"`` passes here
    and the operator raises afterwards when it picked another engine than fused.

    Args:
        device: the model's device.
        engine: the requested or chosen engine.
        mode: ``"eval"`` or ``"train"``.
        model: the network (for its Dropout/BatchNorm modules).
    """
    if engine not in ("auto", "fused"):
        return (
            f"CUDA graphs capture the fused engine's block product, not engine={engine!r} "
            "(use engine='fused' or 'auto')"
        )
    stochastic = [
        f"{type(module).__name__} {name!r}"
        for name, module in model.named_modules()
        if isinstance(module, STOCHASTIC_MODULES)
    ]
    if mode == "train" and stochastic:
        return (
            f"mode='train' with {', '.join(stochastic)}: train-mode Dropout draws new masks and "
            "BatchNorm uses batch statistics, which the fused engine, the one graphs "
            "capture, does not evaluate (use mode='eval')"
        )
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; the model's parameters are on {device}"
    return None


@dataclasses.dataclass
class _Capture:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor  # (dim, b), outside the graph's pool: written before replay
    static_output: torch.Tensor  # (dim, b), in the graph's pool: written by every replay


class CudaGraphBlockProduct:
    """``product(block)`` for ``(dim, b)`` CUDA blocks, captured once per width, replayed.

    One graph per ``(b, dtype)``, each with its own static buffers and private memory pool
    (the scratch of one product at that width). Replays run on the current stream, so
    products must be issued from one stream at a time: they share the static buffers.

    Args:
        product: ``(dim, b) -> (dim, b)``; capture-safe (see the module docstring) and the
            same ops on the same shapes for every block of a width.
        device: the CUDA device of the blocks and of everything ``product`` reads.
        context: entered around the warm-up and the capture (the operator's strict-fp32 and
            model-mode context); the flags it sets are baked into the captured kernels.

    Example:
        >>> graphs = CudaGraphBlockProduct(lambda v: 2.0 * v, torch.device("cuda:0"))
        >>> out = graphs(torch.ones(3, 2, device="cuda:0"))  # captures for b=2, replays
        >>> out.sum().item(), graphs.widths
        (12.0, [(2, torch.float32)])
    """

    def __init__(
        self,
        product: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.product = product
        self.device = device
        self.context = context
        self._captures: dict[tuple[int, torch.dtype], _Capture] = {}

    @property
    def widths(self) -> list[tuple[int, torch.dtype]]:
        """The ``(b, dtype)`` of the graphs held, in capture order."""
        return list(self._captures)

    def __len__(self) -> int:
        return len(self._captures)

    def __call__(self, block: torch.Tensor, *, copy: bool = True) -> torch.Tensor:
        """``product(block)`` by graph replay (capturing first for a new width).

        Args:
            block: ``(dim, b)`` on the device, any strides.
            copy: return a copy of the static output (default). With False the static output
                itself comes back, without the ``dim x b`` device copy: the next product of
                the same width overwrites it in place, so it is only for callers that are
                done with a result before asking for the next one.

        Returns:
            ``(dim, b)``, contiguous.

        Raises:
            RuntimeError: the capture failed (an op in ``product`` is not capture-safe).
        """
        key = (block.shape[1], block.dtype)
        with torch.cuda.device(self.device):
            capture = self._captures.get(key)
            if capture is None:
                capture = self._capture(block)
                self._captures[key] = capture
            else:
                capture.static_input.copy_(block)
            capture.graph.replay()
        # A copy by default: solvers keep earlier products (Lanczos holds H @ V_j next to
        # H @ V_{j+1}), and a view of the static output would change under them at the next
        # replay, silently.
        return capture.static_output.clone() if copy else capture.static_output

    def reset(self) -> None:
        """Drop every graph, its static buffers and its memory pool (to PyTorch's caching
        allocator; ``torch.cuda.empty_cache()`` hands it back to the driver)."""
        self._captures.clear()

    def _capture(self, block: torch.Tensor) -> _Capture:
        static_input = torch.empty(block.shape, dtype=block.dtype, device=block.device)
        static_input.copy_(block)
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with self.context(), torch.cuda.stream(side):
            for _ in range(WARMUP_PRODUCTS):
                self.product(static_input)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with self.context(), torch.cuda.graph(graph):
                static_output = self.product(static_input)
        except RuntimeError as exc:
            raise RuntimeError(
                f"capturing the block product (b={block.shape[1]}, {block.dtype}) in a CUDA "
                f"graph failed: {exc}; an op in the product is not capture-safe (use "
                "cuda_graph=False)"
            ) from exc
        return _Capture(graph, static_input, static_output)
