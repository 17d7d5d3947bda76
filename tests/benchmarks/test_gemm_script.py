"""``benchmarks/gemm.py``: the CPU GEMM comparison runs, checks and records (smoke size)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import _harness as harness  # noqa: E402
from benchmarks import gemm  # noqa: E402
from imc_kernels import ops  # noqa: E402

needs_onednn = pytest.mark.skipif(
    ops._cpu_gemm() != "onednn",
    reason="ops.gemm does not run oneDNN here (no extension or no oneDNN in torch)",
)


def test_layer_products_chain_and_cover_every_layer():
    products = gemm.layer_products((784, 300, 100, 10), rows=16, b=2)
    names = [name for name, _ in products]
    assert len(names) == 2 + 4 + 4  # the first layer has no input tangent
    for _, (a_shape, a_t, b_shape, b_t) in products:
        k_a = a_shape[0] if a_t else a_shape[1]
        k_b = b_shape[1] if b_t else b_shape[0]
        assert k_a == k_b


@needs_onednn
def test_script_records_both_libraries(tmp_path, capsys):
    argv = ["--quick", "--rounds", "1", "--groups", "mlp_lenet,solver", "--out", str(tmp_path)]
    assert gemm.main(argv) == 0
    summary = harness.results_path(tmp_path, "cpu", "-gemm-quick.md").read_text()
    assert "python benchmarks/gemm.py --quick" in summary
    assert "L1 784->300 x dW^T" in summary and "V S col-major m=21 k=10" in summary
    rows = list(harness.results_path(tmp_path, "cpu").read_text().splitlines())
    assert len(rows) == 1 + 10 + 4  # header, the MLP's products, the solver's
    assert "median speedup" in capsys.readouterr().out


@needs_onednn
def test_errors_are_float32_rounding():
    gen = torch.Generator().manual_seed(0)
    row = gemm.run_product("x", ((64, 48), False, (32, 48), True), "g", 1, gen)
    assert row["torch_err"] < 1e-6 and row["ours_err"] < 1e-6


def test_script_refuses_without_onednn(monkeypatch):
    monkeypatch.setenv(ops.CPU_GEMM_ENV, "torch")
    with pytest.raises(SystemExit, match="nothing to compare"):
        gemm.main(["--quick", "--no-save"])
