"""Backend selection by capability (the xformers op-class pattern, DESIGN section 4).

Every op family has up to three implementations:

* ``triton``: the fused Triton kernels in ``imc_kernels/ops/<family>.py``. They run on CUDA
  tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (how CI tests them).
* ``cext``: the compiled C++/CUDA extension ``imc_kernels._C`` (``csrc/``).
* ``reference``: the pure-PyTorch twin in ``imc_kernels/reference/``; runs everywhere.

Each backend reports *why* it cannot run an input; the dispatcher takes the first one that
can, in the order above. ``IMC_KERNELS_BACKEND=reference|triton|cext`` forces one backend and
raises (with the reasons) when it cannot run; :func:`force_backend` does the same inside a
``with`` block, for chosen op families only (the reference twin of the Lanczos solver runs
the solver's ops this way, leaving the operator's kernels alone).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Iterable, Iterator

import torch

BACKENDS = ("triton", "cext", "reference")
ENV_BACKEND = "IMC_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the given input."""


def forced_backend() -> str | None:
    """The backend named by ``IMC_KERNELS_BACKEND``, or None when unset.

    Raises:
        ValueError: the variable names no known backend.
    """
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


# (backend, op families or None for all) of the enclosing force_backend blocks, innermost last.
# A context variable, so a block in one thread (or task) does not change another's dispatch.
_FORCED_IN_CONTEXT: contextvars.ContextVar[tuple[tuple[str, frozenset[str] | None], ...]] = (
    contextvars.ContextVar("imc_kernels_forced_backend", default=())
)


@contextlib.contextmanager
def force_backend(backend: str, ops: Iterable[str] | None = None) -> Iterator[None]:
    """Run the op families ``ops`` (every family when None) on ``backend`` inside the block.

    Like ``IMC_KERNELS_BACKEND``, but scoped to the block and to the current thread, and
    limited to the named families (the ``op`` names :func:`select` is called with, such as
    ``"tsmm"`` and ``"block_orth"``); other families dispatch as usual. It takes precedence
    over the environment variable; in nested blocks the innermost one naming a family wins.
    :func:`select` raises :class:`BackendUnavailableError` when the forced backend cannot run.

    Args:
        backend: one of :data:`BACKENDS`.
        ops: op family names, or None for all.

    Raises:
        ValueError: an unknown backend.

    Example:
        >>> with force_backend("reference", ops=("tsmm",)):
        ...     select("tsmm", torch.device("cpu"), available=("cext", "reference"))
        'reference'
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    families = None if ops is None else frozenset([ops] if isinstance(ops, str) else ops)
    token = _FORCED_IN_CONTEXT.set((*_FORCED_IN_CONTEXT.get(), (backend, families)))
    try:
        yield
    finally:
        _FORCED_IN_CONTEXT.reset(token)


def _forced_for(op: str) -> tuple[str, str] | None:
    """``(backend, what forced it)`` for op family ``op``, or None when nothing forces one."""
    for backend, families in reversed(_FORCED_IN_CONTEXT.get()):
        if families is None or op in families:
            return backend, f"force_backend({backend!r})"
    backend = forced_backend()
    return None if backend is None else (backend, f"{ENV_BACKEND}={backend}")


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None when triton imports, else the reason it does not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton failed to import: {exc}"
    return None


def triton_unsupported_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why the Triton kernels cannot run on ``device``/``dtype``; None when they can."""
    reason = triton_import_error()
    if reason:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if not triton_interpret():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if dtype is torch.bfloat16:
            # The interpreter mishandles bf16 loads and dots (triton-lang/triton#4972).
            return "the Triton interpreter does not support bfloat16"
        return None
    return f"Triton kernels do not support device type {device.type!r}"


def cext_unsupported_reason(device: torch.device, op: str | None = None) -> str | None:
    """Why the compiled extension cannot run on ``device`` (op ``op``); None when it can."""
    from imc_kernels import _ext

    info = _ext.load()
    if info.module is None:
        return f"the C++ extension is not available ({info.reason})"
    if op is not None and not _ext.has_op(op):
        return (
            f"the loaded C++ extension predates op {op!r} ({info.reason}); rebuild it with "
            "pip install --no-build-isolation -e ."
        )
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if info.cuda else "the C++ extension was built without CUDA"
    return f"the C++ extension does not support device type {device.type!r}"


def select(
    op: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    available: tuple[str, ...] = BACKENDS,
    cext_op: str | None = None,
) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    Args:
        op: the op family's name, for error messages.
        device: where the inputs live.
        dtype: the inputs' dtype, when a backend restricts it.
        available: the backends this op family implements, in priority order.
        cext_op: the name of the extension's op, checked to exist in the loaded build.

    Returns:
        One of ``"triton"``, ``"cext"``, ``"reference"``.

    Raises:
        BackendUnavailableError: ``IMC_KERNELS_BACKEND`` or :func:`force_backend` forces a
            backend that cannot run.
    """
    reasons = {}
    for name in available:
        if name == "triton":
            reasons[name] = triton_unsupported_reason(device, dtype)
        elif name == "cext":
            reasons[name] = cext_unsupported_reason(device, cext_op)
        else:
            reasons[name] = None
    forcing = _forced_for(op)
    if forcing is not None:
        forced, source = forcing
        if forced not in available:
            raise BackendUnavailableError(
                f"{source} but op {op!r} has no {forced} implementation "
                f"(it has {', '.join(available)})"
            )
        if reasons[forced] is not None:
            raise BackendUnavailableError(
                f"{source} cannot run op {op!r} on {device}: {reasons[forced]}"
            )
        return forced
    for name in available:
        if reasons[name] is None:
            return name
    raise BackendUnavailableError(f"no backend can run op {op!r} on {device}: {reasons}")
