"""``imc_kernels.build_info()`` and ``python -m imc_kernels.env_report``."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_cpu_gemm(monkeypatch):
    monkeypatch.setenv("IMC_CPU_GEMM", "torch")
    assert imc_kernels.build_info()["cpu_gemm"] == "torch"
    monkeypatch.setenv("IMC_CPU_GEMM", "blas")
    assert imc_kernels.build_info()["cpu_gemm"].startswith("invalid")
    monkeypatch.delenv("IMC_CPU_GEMM")
    loaded = _ext.load().module is not None
    expected = "onednn" if loaded and torch.ops.imc_kernels.gemm_uses_onednn() else "torch"
    assert imc_kernels.build_info()["cpu_gemm"] == expected


def test_forced_backend(monkeypatch):
    monkeypatch.setenv("IMC_KERNELS_BACKEND", "reference")
    assert imc_kernels.build_info()["forced_backend"] == "reference"
    monkeypatch.setenv("IMC_KERNELS_BACKEND", "nonsense")
    assert imc_kernels.build_info()["forced_backend"].startswith("invalid")
    monkeypatch.delenv("IMC_KERNELS_BACKEND")
    assert imc_kernels.build_info()["forced_backend"] is None


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
