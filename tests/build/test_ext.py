"""The extension loader (imc_kernels/_ext.py): the CUDA build rule, the fallbacks, the JIT build.

The fallback and JIT tests run in subprocesses, because :func:`imc_kernels._ext.load` runs once
per process and an op library cannot be registered twice in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from imc_kernels import _ext

REPO = Path(__file__).resolve().parents[2]


def _fake_torch(cuda_version=None, gpu=None):
    """A stand-in for the torch module with just what cuda_build_decision reads."""
    return types.SimpleNamespace(
        __version__="9.9.0",
        version=types.SimpleNamespace(cuda=cuda_version),
        cuda=types.SimpleNamespace(
            is_available=lambda: gpu is not None, get_device_name=lambda index: gpu
        ),
    )


@pytest.fixture
def clean_env(monkeypatch):
    for name in (_ext.ENV_FORCE_CUDA, _ext.ENV_SKIP_CUDA, "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def toolkit(clean_env):
    """A CUDA toolkit with nvcc 12.4 as far as the rule can tell."""
    from torch.utils import cpp_extension

    clean_env.setattr(cpp_extension, "CUDA_HOME", "/opt/fake-cuda")
    clean_env.setattr(_ext, "nvcc_version", lambda cuda_home: (12, 4))
    return clean_env


def test_cpu_torch_builds_cpu_only(clean_env):
    build, reason = _ext.cuda_build_decision(_fake_torch(cuda_version=None))
    assert not build and "has no CUDA" in reason


def test_skip_and_force_override(clean_env):
    clean_env.setenv(_ext.ENV_FORCE_CUDA, "1")
    assert _ext.cuda_build_decision(_fake_torch()) == (True, "IMC_FORCE_CUDA=1")
    clean_env.setenv(_ext.ENV_SKIP_CUDA, "1")  # skip wins over force
    assert _ext.cuda_build_decision(_fake_torch("12.4", gpu="H100")) == (False, "IMC_SKIP_CUDA=1")


def test_missing_toolkit(clean_env):
    from torch.utils import cpp_extension

    clean_env.setattr(cpp_extension, "CUDA_HOME", None)
    build, reason = _ext.cuda_build_decision(_fake_torch("12.4", gpu="H100"))
    assert not build and "CUDA_HOME" in reason


def test_nvcc_major_must_match_torch(toolkit):
    build, reason = _ext.cuda_build_decision(_fake_torch("13.0", gpu="H100"))
    assert not build and "does not match" in reason
    build, reason = _ext.cuda_build_decision(_fake_torch("12.8", gpu="H100"))
    assert build and "GPU H100" in reason


def test_no_gpu_needs_arch_list(toolkit):
    build, reason = _ext.cuda_build_decision(_fake_torch("12.1"))
    assert not build and "TORCH_CUDA_ARCH_LIST" in reason
    toolkit.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    build, reason = _ext.cuda_build_decision(_fake_torch("12.1"))
    assert build and "TORCH_CUDA_ARCH_LIST=9.0" in reason


def test_this_machine_agrees_with_the_loaded_extension(clean_env):
    build, reason = _ext.cuda_build_decision(torch)
    info = _ext.load()
    if torch.version.cuda is None:
        assert not build and "has no CUDA" in reason
        assert not info.cuda
    assert info.source in ("aot", "jit", "none")


def test_sources_are_found():
    root = _ext.source_dir()
    assert root is not None
    cpp, cu = _ext.find_sources(root)
    names = {p.relative_to(root).as_posix() for p in cpp + cu}
    assert {"imc_ops.cpp", "lanczos/tsmm_cpu.cpp", "lanczos/tsmm_cuda.cu"} <= names


# Run in a fresh interpreter with the ahead-of-time build hidden; prints what load() found.
_PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    sys.modules["imc_kernels._C"] = None  # hide the ahead-of-time build
    import torch
    import imc_kernels
    from imc_kernels import _ext
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = _ext.load()
        _ext.load()
        x, y = torch.randn(100, 3), torch.randn(100, 2)
        out = imc_kernels.ops.tsmm_xty(x, y)
        out = imc_kernels.ops.tsmm_xty(x, y)
    print(json.dumps({
        "source": info.source,
        "cuda": info.cuda,
        "reason": info.reason,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "correct": torch.allclose(out, x.double().T @ y.double(), rtol=1e-12, atol=1e-12),
        "raw_op": hasattr(torch.ops.imc_kernels, "tsmm_xty"),
        "extension": imc_kernels.build_info()["extension"],
    }))
    """
)


def _probe(tmp_path, **env):
    full_env = {**os.environ, _ext.ENV_CACHE: str(tmp_path / "cache"), **env}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_without_aot_and_jit_the_reference_runs_and_warns_once(tmp_path):
    found, _ = _probe(tmp_path, **{_ext.ENV_NO_JIT: "1"})
    assert found["source"] == "none" and found["extension"] == "none"
    assert "IMC_NO_JIT=1" in found["reason"] and "ahead-of-time" in found["reason"]
    assert len(found["warnings"]) == 1 and "reference" in found["warnings"][0]
    assert found["correct"]


@pytest.mark.slow
def test_jit_build_from_sources_then_cache_hit(tmp_path):
    found, stderr = _probe(tmp_path)
    assert found["source"] == "jit", found["reason"]
    assert found["raw_op"] and found["correct"] and not found["warnings"]
    assert "JIT-building" in stderr
    builds = list((tmp_path / "cache").iterdir())
    assert len(builds) == 1 and builds[0].name.startswith(torch.__version__ + "-")
    # A second process reuses the cached build without compiling again.
    found, stderr = _probe(tmp_path)
    assert found["source"] == "jit" and "JIT-building" not in stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the check runs the system C++ compiler")
@pytest.mark.parametrize("source", ["tsmm_cpu.cpp", "block_orth_cpu.cpp"])
def test_cpu_kernels_compile_without_shufflevector(source):
    # Compilers before GCC 12 have no __builtin_shufflevector; the kernels then take scalar
    # lane sums and tail loads (tsmm_cpu.h). This builds that path here, where the compiler
    # has it, by forcing it off: a syntax and type check with the extension's flags.
    import shutil

    from torch.utils import cpp_extension

    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    import sysconfig

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    command = [
        compiler,
        "-std=c++20",
        "-fsyntax-only",
        "-fopenmp",
        "-Wall",
        "-Werror=return-type",
        "-DIMC_TEST_NO_SHUFFLE",
        *includes,
        str(REPO / "csrc" / "lanczos" / source),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
