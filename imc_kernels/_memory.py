"""Byte budgets for buffers kept between calls, read from the environment."""

from __future__ import annotations

import os


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
