"""``benchmarks/gpu_session.sh``, the prepared script for a lent GPU machine, checked on CPU.

The full dry run (``DRY=1 ... build test bench``, about 70 s here) is too slow for CI; these
check the script parses, logs each step with its status and refuses an unknown stage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path, *stages):
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *stages], env=env, capture_output=True, text=True, timeout=300
    )


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_build_stage_reports_the_environment(tmp_path):
    result = _run(tmp_path, "build")
    assert result.returncode == 0, result.stderr
    session = (tmp_path / "out" / "session.log").read_text()
    assert "DRY=1: no install" in session
    assert "end env_report: status 0" in session
    report = (tmp_path / "out" / "env_report.log").read_text()
    assert "cpu_gemm" in report and "extension" in report


def test_unknown_stage_is_refused(tmp_path):
    result = _run(tmp_path, "benchmark")
    assert result.returncode == 2
    assert "unknown stage benchmark" in (tmp_path / "out" / "session.log").read_text()
