"""``imc_kernels.build_info()`` and ``python -m imc_kernels.env_report``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import imc_kernels
from imc_kernels import _ext

KEYS = {
    "imc_kernels_version",
    "extension",
    "extension_cuda",
    "extension_reason",
    "triton_version",
    "triton_mode",
    "triton_reason",
    "torch_version",
    "torch_cuda",
    "cuda_available",
    "devices",
    "forced_backend",
    "cpu_gemm",
}


def test_keys_and_values():
    info = imc_kernels.build_info()
    assert set(info) == KEYS
    ext = _ext.load()
    assert (info["extension"], info["extension_cuda"]) == (ext.source, ext.cuda)
    assert info["extension_reason"] == ext.reason
    assert info["triton_mode"] in ("cuda", "interpreter", "unavailable")
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert info["devices"][0].startswith("cpu: ")
    assert len(info["devices"]) == 1 + (
        torch.cuda.device_count() if torch.cuda.is_available() else 0
    )
    json.dumps(info)  # serializable for the report


def _default_cpu_gemm():
    loaded = _ext.load().module is not None
    return "onednn" if loaded and torch.ops.imc_kernels.gemm_uses_onednn() else "torch"


@pytest.mark.parametrize(
    "key, variable, value, invalid, default",
    [
        ("cpu_gemm", "IMC_CPU_GEMM", "torch", "blas", _default_cpu_gemm),
        ("forced_backend", "IMC_KERNELS_BACKEND", "reference", "nonsense", lambda: None),
    ],
)
def test_environment_variables_are_reported(monkeypatch, key, variable, value, invalid, default):
    monkeypatch.setenv(variable, value)
    assert imc_kernels.build_info()[key] == value
    monkeypatch.setenv(variable, invalid)
    assert imc_kernels.build_info()[key].startswith("invalid")
    monkeypatch.delenv(variable)
    assert imc_kernels.build_info()[key] == default()


def test_triton_mode_follows_interpreter_flag(monkeypatch):
    if torch.cuda.is_available():
        assert imc_kernels.build_info()["triton_mode"] in ("cuda", "unavailable")
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = (
        "unavailable" if imc_kernels.build_info()["triton_version"] is None else "interpreter"
    )
    assert imc_kernels.build_info()["triton_mode"] == expected
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert imc_kernels.build_info()["triton_mode"] == "unavailable"


def test_env_report_runs():
    result = subprocess.run(
        [sys.executable, "-m", "imc_kernels.env_report"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "extension" in result.stdout and "torch_version" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "imc_kernels.env_report", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == KEYS
