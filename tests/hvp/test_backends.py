"""The fused engine on each kernel backend against the dense fp64 oracle.

The rest of the suite runs with ``TRITON_INTERPRET=1`` on CPU, so the fused engine goes
through the Triton kernels there. On the reference backend (what CPU users get) the rules
cache the primal-only quantities (activation derivatives, the softmax) once per operator;
this file runs the whole catalogue on that path too.
"""

import pytest
import torch

from imc_kernels import HessianOperator

# fp32 products against an fp64 oracle: rounding grows with depth and the spread of the
# spectrum; every catalogue model measures under 5e-7 (see test_engines_vs_oracle.py).
FP32_TOL = 1e-5


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_fused_backend_matches_oracle(
    case_name, backend, curvature, oracles, dense_oracle, monkeypatch
):
    model, loss_fn, batch = oracles.build_case(case_name)
    monkeypatch.setenv("IMC_KERNELS_BACKEND", backend)
    op = HessianOperator(model, loss_fn, batch, curvature=curvature, engine="fused")
    block = oracles.random_block(op.dim, 3)
    expected = dense_oracle(case_name, curvature) @ block.double()
    assert oracles.rel_err(op @ block, expected) <= FP32_TOL


@pytest.mark.parametrize("library", ["onednn", "torch"])
@pytest.mark.parametrize("case", ["mlp_relu", "linear_3d_bn1d_ncl", "conv_same_maxpool_ceil"])
def test_fused_engine_matches_oracle_with_either_cpu_gemm(
    case, library, oracles, dense_oracle, monkeypatch
):
    """The Linear rule's products through oneDNN and through torch's GEMM (``IMC_CPU_GEMM``)."""
    monkeypatch.setenv("IMC_CPU_GEMM", library)
    model, loss_fn, batch = oracles.build_case(case)
    op = HessianOperator(model, loss_fn, batch, engine="fused")
    block = oracles.random_block(op.dim, 4)
    expected = dense_oracle(case, "hessian") @ block.double()
    assert oracles.rel_err(op @ block, expected) <= FP32_TOL


def test_reference_backend_reuses_the_primal(oracles, monkeypatch):
    """Two blocks through one operator equal two fresh operators (nothing stale is cached)."""
    monkeypatch.setenv("IMC_KERNELS_BACKEND", "reference")
    model, loss_fn, batch = oracles.build_case("mlp_gelu")
    op = HessianOperator(model, loss_fn, batch, engine="fused")
    first, second = oracles.random_block(op.dim, 2, seed=1), oracles.random_block(op.dim, 5, seed=2)
    op @ first
    fresh = HessianOperator(model, loss_fn, batch, engine="fused")
    assert torch.equal(op @ second, fresh @ second)
