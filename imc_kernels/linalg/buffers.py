"""Solver buffers kept from one CPU solve to the next: the basis and the stored products.

A Lanczos solve's large allocations are its basis and its stored products, ``m`` rows of
``n`` floats each (2 x 33 MB for LeNet-300-100 at k = 10). glibc hands an allocation over its
mmap threshold (at most 32 MiB) back to the kernel when it is freed, so every fresh solve
page-faults them in again, 4 KiB at a time: about 13,800 faults, ~20 ms of a 0.25 s solve on
our CPU machine (1.5 us a fault there; transparent huge pages and ``MADV_POPULATE_WRITE`` were
measured slower, not faster). Kept and handed to the next solve of the same size, they cost
nothing: the common case in a pipeline that tracks the top of the spectrum through training.

The cache holds buffers that no solve is using, up to a byte limit (the environment variable
``IMC_SOLVER_CACHE_BYTES``, default one 32nd of physical memory; 0 keeps nothing), the least
recently returned dropped first. :func:`empty_cache` frees them all. A buffer comes back to
the cache only when nothing else refers to its memory (a result, or a view a callback kept,
makes the solver drop it instead), so a later solve never writes into memory a caller holds.
On CUDA the cache is not used: torch's caching allocator already reuses device memory.
"""

from __future__ import annotations

import functools
import threading

import torch

from imc_kernels._memory import byte_budget

ENV_CACHE_BYTES = "IMC_SOLVER_CACHE_BYTES"
DEFAULT_CACHE_FRACTION = 32  # of physical memory

_lock = threading.Lock()
_free: list[torch.Tensor] = []  # flat buffers no solve holds, least recently returned first
_limit: int | None = None  # None: from the environment, read at first use


def default_cache_bytes() -> int:
    """``IMC_SOLVER_CACHE_BYTES`` if set, else one 32nd of physical memory (512 MiB where that
    cannot be read).

    Raises:
        ValueError: the variable is not a non-negative integer.
    """
    return byte_budget(
        ENV_CACHE_BYTES, DEFAULT_CACHE_FRACTION, 2**29, "0 keeps no buffer between solves"
    )


def cache_limit() -> int:
    """The byte limit of the cache now in force."""
    global _limit
    with _lock:
        if _limit is None:
            _limit = default_cache_bytes()
        return _limit


def set_cache_limit(nbytes: int | None) -> None:
    """Set the cache's byte limit (``None``: back to :func:`default_cache_bytes`); buffers
    over the new limit are freed at once.

    Raises:
        ValueError: ``nbytes`` is not a non-negative integer or None.
    """
    global _limit
    valid = isinstance(nbytes, int) and not isinstance(nbytes, bool) and nbytes >= 0
    if nbytes is not None and not valid:
        raise ValueError(f"the cache limit must be a non-negative integer or None, got {nbytes!r}")
    limit = default_cache_bytes() if nbytes is None else nbytes
    with _lock:
        _limit = limit
        _trim(limit)


def cached_bytes() -> int:
    """Bytes the cache holds now."""
    with _lock:
        return sum(_nbytes(t) for t in _free)


def reusable_bytes(numels, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes of buffers of the given sizes that :func:`take` would serve from the cache now
    (each cached buffer counted once): memory a solve of those sizes does not allocate."""
    if torch.device(device).type != "cpu":
        return 0
    with _lock:
        free = [t.numel() for t in _free if t.dtype == dtype]
        total = 0
        for numel in numels:
            if numel in free:
                free.remove(numel)
                total += numel * torch.empty(0, dtype=dtype).element_size()
        return total


def empty_cache() -> None:
    """Free every buffer the cache holds."""
    with _lock:
        _free.clear()


def take(numel: int, dtype: torch.dtype, device: torch.device, *, zero: bool = False):
    """A flat ``numel`` buffer: a cached one of exactly that size, dtype and device if there
    is one (contents left over from the solve that returned it, unless ``zero``), else a
    fresh ``torch.empty`` (``torch.zeros`` with ``zero``)."""
    device = torch.device(device)
    if device.type == "cpu":
        with _lock:
            for i, buffer in enumerate(_free):
                if buffer.numel() == numel and buffer.dtype == dtype:
                    del _free[i]
                    return buffer.zero_() if zero else buffer
    factory = torch.zeros if zero else torch.empty
    return factory(numel, dtype=dtype, device=device)


def give(buffer: torch.Tensor) -> bool:
    """Return a buffer from :func:`take` for a later solve; says whether the cache kept it.

    The caller must hold no view of it any more. It is kept only on the CPU, within the
    limit, and when nothing else refers to its memory; the oldest buffers make room first.
    """
    if buffer.device.type != "cpu" or not _sole_reference(buffer):
        return False
    size = _nbytes(buffer)
    limit = cache_limit()
    if size > limit:
        return False
    with _lock:
        _trim(limit - size)
        _free.append(buffer)
    return True


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _trim(limit: int) -> None:
    """Drop the oldest buffers until at most ``limit`` bytes remain (lock held)."""
    total = sum(_nbytes(t) for t in _free)
    while _free and total > limit:
        total -= _nbytes(_free.pop(0))


def _sole_reference(buffer: torch.Tensor) -> bool:
    """Whether ``buffer`` is the only tensor on its memory (no view or result shares it)."""
    baseline = _use_count_baseline()
    if baseline is None or buffer._base is not None or buffer.storage_offset() != 0:
        return False
    storage = buffer.untyped_storage()  # alive while counted, as in the calibration
    if storage.nbytes() != _nbytes(buffer):
        return False
    return torch._C._storage_Use_Count(storage._cdata) == baseline


@functools.cache
def _use_count_baseline() -> int | None:
    """The storage use count torch reports for a tensor nothing else shares, or None when the
    counter is missing or does not see views (then nothing is ever cached).

    Calibrated on a probe rather than assumed: what the count includes (the tensor, the
    Python storage object made to read it) differs between torch builds."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    if counter is None:
        return None
    probe = torch.empty(1)
    alone = counter(probe.untyped_storage()._cdata)
    view = probe.view(1)  # noqa: F841 - alive while counted
    return alone if counter(probe.untyped_storage()._cdata) == alone + 1 else None
