"""Backend selection by capability (the xformers op-class pattern, DESIGN section 4).

Every op family has up to three implementations:

* ``triton``: the fused Triton kernels in ``imc_kernels/ops/<family>.py``. They run on CUDA
  tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (how CI tests them).
* ``cext``: the compiled C++/CUDA extension ``imc_kernels._C`` (``csrc/``).
* ``reference``: the pure-PyTorch twin in ``imc_kernels/reference/``; runs everywhere.

Each backend reports *why* it cannot run an input; the dispatcher takes the first one that
can, in the order above. ``IMC_KERNELS_BACKEND=reference|triton|cext`` forces one backend and
raises (with the reasons) when it cannot run.
"""

from __future__ import annotations

import functools
import importlib.util
import os

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


def cext_unsupported_reason(device: torch.device) -> str | None:
    """Why the compiled extension cannot run on ``device``; None when it can."""
    from imc_kernels import _ext

    info = _ext.load()
    if info.module is None:
        return f"the C++ extension is not available ({info.reason})"
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
) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    Args:
        op: the op family's name, for error messages.
        device: where the inputs live.
        dtype: the inputs' dtype, when a backend restricts it.
        available: the backends this op family implements, in priority order.

    Returns:
        One of ``"triton"``, ``"cext"``, ``"reference"``.

    Raises:
        BackendUnavailableError: ``IMC_KERNELS_BACKEND`` forces a backend that cannot run.
    """
    reasons = {}
    for name in available:
        if name == "triton":
            reasons[name] = triton_unsupported_reason(device, dtype)
        elif name == "cext":
            reasons[name] = cext_unsupported_reason(device)
        else:
            reasons[name] = None
    forced = forced_backend()
    if forced is not None:
        if forced not in available:
            raise BackendUnavailableError(
                f"{ENV_BACKEND}={forced} but op {op!r} has no {forced} implementation "
                f"(it has {', '.join(available)})"
            )
        if reasons[forced] is not None:
            raise BackendUnavailableError(
                f"{ENV_BACKEND}={forced} cannot run op {op!r} on {device}: {reasons[forced]}"
            )
        return forced
    for name in available:
        if reasons[name] is None:
            return name
    raise BackendUnavailableError(f"no backend can run op {op!r} on {device}: {reasons}")
