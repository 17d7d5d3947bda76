"""Memory: byte budgets for buffers kept between calls (read from the environment), and a
check that a large allocation fits before it is made."""

from __future__ import annotations

import os

import torch


def byte_budget(variable: str, fraction: int, fallback: int, zero_means: str) -> int:
    """``variable`` from the environment if it is set, else ``1/fraction`` of physical memory
    (``fallback`` bytes where that cannot be read).

    Args:
        variable: the environment variable, a non-negative number of bytes.
        fraction: the default's share of physical memory.
        fallback: the default where physical memory cannot be read.
        zero_means: what 0 does, for the error message.

    Raises:
        ValueError: the variable is set to anything but a non-negative integer.
    """
    setting = os.environ.get(variable, "").strip()
    if setting:
        try:
            value = int(setting)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(
                f"{variable}={setting!r} must be a non-negative number of bytes ({zero_means})"
            )
        return value
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // fraction
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not a POSIX system
        return fallback


def available_bytes(device: torch.device) -> int | None:
    """Memory that an allocation on ``device`` can still get, or None where it cannot be read.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (Linux; what the kernel can hand out without
    swapping). CUDA: the device's free memory plus what torch's caching allocator holds
    unused.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(nbytes: int, device: torch.device, what: str, advice: str) -> None:
    """Raise a MemoryError that says what to change when ``nbytes`` cannot fit on ``device``
    (instead of an allocation that fails deep inside, or a process the kernel kills).

    Args:
        nbytes: the memory the step about to run needs.
        device: where it is allocated.
        what: the step, for the message ("the Krylov basis (...)").
        advice: what the caller can change.

    Raises:
        MemoryError: ``nbytes`` exceeds :func:`available_bytes` (never where that is None).
    """
    available = available_bytes(device)
    if available is None or nbytes <= available:
        return
    raise MemoryError(
        f"{what} needs {_gb(nbytes)}, but {_gb(available)} of {device} memory is available; "
        f"{advice}"
    )


def _gb(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"
