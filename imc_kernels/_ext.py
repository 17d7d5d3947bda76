"""Loads the compiled extension ``imc_kernels._C`` (DESIGN section 4).

Order: the ahead-of-time build installed with the package; else a JIT build of the shipped
``csrc/`` sources with ninja (cached); else none, in which case every op runs its pure-PyTorch
reference and a one-time warning says so.

PLACEHOLDER CONTRACT (being implemented): ``load()`` returns an :class:`ExtInfo`.
"""

from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class ExtInfo:
    """What :func:`load` found."""

    module: object | None  # the loaded module, None when unavailable
    source: str  # "aot" | "jit" | "none"
    cuda: bool  # CUDA kernels compiled in
    reason: str  # why this source (human-readable)


@functools.lru_cache(maxsize=1)
def load() -> ExtInfo:
    return ExtInfo(None, "none", False, "not built yet")
