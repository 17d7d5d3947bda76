"""What is active in this process: extension, Triton mode, versions, devices (DESIGN section 3).

``imc_kernels.build_info()`` answers the first question of every bug report; ``python -m
imc_kernels.env_report`` prints it.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from imc_kernels import _dispatch, _ext
from imc_kernels._version import __version__


def _cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else platform's guess."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _devices() -> list[str]:
    devices = [f"cpu: {_cpu_name()} ({torch.get_num_threads()} torch threads)"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            name = torch.cuda.get_device_name(index)
            devices.append(f"cuda:{index}: {name} (sm_{major}{minor})")
    return devices


def _triton() -> tuple[str | None, str, str]:
    """``(version, mode, reason)`` with mode ``cuda``, ``interpreter`` or ``unavailable``."""
    error = _dispatch.triton_import_error()
    if error is not None:
        return None, "unavailable", error
    import triton

    version = triton.__version__
    if torch.cuda.is_available():
        return version, "cuda", "Triton kernels run on CUDA tensors"
    if _dispatch.triton_interpret():
        return version, "interpreter", "TRITON_INTERPRET=1: Triton kernels run on CPU (slow)"
    return version, "unavailable", "no CUDA device (TRITON_INTERPRET=1 runs them on CPU, for tests)"


def _forced_backend() -> str | None:
    try:
        return _dispatch.forced_backend()
    except ValueError as exc:
        return f"invalid: {exc}"


def build_info() -> dict[str, object]:
    """Report what imc_kernels runs with in this process.

    Loads the C++ extension if that has not happened yet (which may JIT-build it).

    Returns:
        A dict with the keys ``imc_kernels_version``, ``extension`` (``"aot"``, ``"jit"`` or
        ``"none"``), ``extension_cuda`` (CUDA kernels compiled in), ``extension_reason``,
        ``triton_version`` (None when not installed), ``triton_mode`` (``"cuda"``,
        ``"interpreter"`` or ``"unavailable"``), ``triton_reason``, ``torch_version``,
        ``torch_cuda`` (torch's CUDA version, None for a CPU build), ``cuda_available``,
        ``devices`` (one line per device), ``forced_backend`` (``IMC_KERNELS_BACKEND``, None
        when unset) and ``cpu_gemm`` (the library of float32 CPU products,
        :func:`imc_kernels.ops.gemm`: ``"onednn"`` or ``"torch"``, or ``"invalid: ..."`` for a
        bad ``IMC_CPU_GEMM``).

    Example:
        >>> import imc_kernels
        >>> imc_kernels.build_info()["extension"] in ("aot", "jit", "none")
        True
    """
    ext = _ext.load()
    triton_version, triton_mode, triton_reason = _triton()
    return {
        "imc_kernels_version": __version__,
        "extension": ext.source,
        "extension_cuda": ext.cuda,
        "extension_reason": ext.reason,
        "triton_version": triton_version,
        "triton_mode": triton_mode,
        "triton_reason": triton_reason,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": _devices(),
        "forced_backend": _forced_backend(),
        "cpu_gemm": _cpu_gemm(),
    }


def _cpu_gemm() -> str:
    from imc_kernels import ops

    try:
        return ops._cpu_gemm()
    except ValueError as exc:
        return f"invalid: {exc}"
