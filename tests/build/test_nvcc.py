"""Compile-check every ``csrc/**/*.cu`` with nvcc, also on machines without a GPU (DESIGN 4).

The flags are those torch's BuildExtension passes to nvcc (C++20, the torch include paths,
the extension defines, the half-precision guards), for sm_90. A CPU-only torch wheel ships
the CUDA headers of ATen and c10 but not c10's generated cuda_cmake_macros.h, which only sets
Windows export macros: C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it there. ``make cuda-check``
runs this file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parents[2]
CUDA_SOURCES = sorted((REPO / "csrc").rglob("*.cu"))
ARCH = os.environ.get("IMC_NVCC_CHECK_ARCH", "sm_90")


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


NVCC = _find_nvcc()


def nvcc_command(source: Path, output: Path) -> list[str]:
    """nvcc arguments that compile ``source`` like the extension build would."""
    includes = cpp_extension.include_paths()  # torch's; nvcc adds the toolkit's own
    torch_include = Path(includes[0])
    defines = [
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [
        NVCC,
        "-c",
        str(source),
        "-o",
        str(output),
        f"-arch={ARCH}",
        "-std=c++20",
        "-O3",
        *[arg for path in includes for arg in ("-isystem", path)],
        *defines,
        *cpp_extension.COMMON_NVCC_FLAGS,
        "--compiler-options",
        "-fPIC,-Wall",
    ]


@pytest.mark.slow  # ~35 s per file on two busy CPU cores
@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize(
    "source", CUDA_SOURCES, ids=[p.relative_to(REPO).as_posix() for p in CUDA_SOURCES]
)
def test_cuda_source_compiles_cleanly(source, tmp_path):
    result = subprocess.run(
        nvcc_command(source, tmp_path / (source.stem + ".o")),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ours = [line for line in (result.stdout + result.stderr).splitlines() if source.name in line]
    assert not any("warning" in line.lower() for line in ours), "\n".join(ours)
