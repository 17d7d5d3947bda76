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
import torch

from imc_kernels import _dispatch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path, *stages, **overrides):
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    env.update({name: str(value) for name, value in overrides.items()})
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


def test_conv2_stage_saves_its_runs_and_resumes_from_the_carry(tmp_path):
    # DRY: Conv-2 --quick, dense + random + one-shot at 5 %, seed 0, two worker processes.
    runs = tmp_path / "runs"
    # The pure-PyTorch twins, as in tests/prune: the interpreted Triton kernels would make
    # every optimizer step of the training runs thousands of times slower.
    twins = {} if torch.cuda.is_available() else {_dispatch.ENV_BACKEND: "reference"}
    first = _run(tmp_path, "conv2", CONV2_RUNS=runs, **twins)
    assert first.returncode == 0, first.stderr
    session = (tmp_path / "out" / "session.log").read_text()
    assert "end conv2: status 0" in session and "conv2: 3 runs saved" in session
    copied = list((tmp_path / "out" / "results" / "conv2").rglob("runs.jsonl"))
    assert len(copied) == 1 and len(copied[0].read_text().splitlines()) == 3
    assert not list((tmp_path / "out" / "results" / "conv2").rglob("*.pt"))  # no checkpoints

    # A fresh machine: nothing under CONV2_RUNS, the runs.jsonl carried in.
    carry = tmp_path / "carry"
    (carry / "conv2").mkdir(parents=True)
    (carry / "conv2" / "runs.jsonl").write_text(copied[0].read_text())
    out2 = tmp_path / "out2"
    again = _run(tmp_path, "conv2", CONV2_RUNS=tmp_path / "fresh", CARRY=carry, OUT=out2, **twins)
    assert again.returncode == 0, again.stderr
    session = (out2 / "session.log").read_text()
    assert "resuming from the carried runs.jsonl (3 runs)" in session
    log = (out2 / "conv2.log").read_text()
    assert "seed 0 random" not in log  # nothing ran again
    assert "conv2: 3 runs saved" in session
