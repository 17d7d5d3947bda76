"""The engines on CUDA: the fused engine's compiled Triton kernels against func and the fp64
oracle, blocks of 8, and determinism. Skipped without a CUDA device (``gpu`` marker).

TF32 is off inside the operator (DESIGN section 6), so fp32 products keep fp32 accuracy and
the CPU tolerances hold: 1e-5 relative against the oracle, 1e-5 between engines.
"""

from __future__ import annotations

import pytest
import torch

from imc_kernels import HessianOperator

pytestmark = pytest.mark.gpu

GPU_CASES = ["mlp_gelu", "ce_ignore_index", "conv_conv_groups_stride", "conv_bn2d_affine_adaptive"]


def _cuda_operator(oracles, case_name, engine, curvature, dtype=torch.float32):
    model, loss_fn, batch = oracles.build_case(case_name)
    model, batch = oracles.cast(model, batch, dtype, device="cuda")
    return HessianOperator(model, loss_fn, batch, engine=engine, curvature=curvature)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("case_name", GPU_CASES)
def test_fused_matches_func_and_oracle_on_cuda(oracles, dense_oracle, case_name, curvature):
    reference = dense_oracle(case_name, curvature)
    fused = _cuda_operator(oracles, case_name, "fused", curvature)
    func = _cuda_operator(oracles, case_name, "func", curvature)
    assert fused.device.type == "cuda"
    block = oracles.random_block(fused.dim, 8, seed=61, device="cuda")
    out_fused, out_func = fused @ block, func @ block
    assert out_fused.device.type == "cuda" and out_fused.dtype == torch.float32
    expected = reference @ block.double().cpu()
    assert oracles.rel_err(out_fused.cpu(), expected) <= 1e-5
    assert oracles.rel_err(out_func.cpu(), expected) <= 1e-5
    assert oracles.rel_err(out_fused.cpu(), out_func.double().cpu()) <= 1e-5


@pytest.mark.parametrize("case_name", GPU_CASES)
def test_fp64_on_cuda(oracles, dense_oracle, case_name):
    reference = dense_oracle(case_name, "hessian")
    op = _cuda_operator(oracles, case_name, "fused", "hessian", torch.float64)
    block = oracles.random_block(op.dim, 8, torch.float64, seed=67, device="cuda")
    assert oracles.rel_err((op @ block).cpu(), reference @ block.cpu()) <= 1e-10


@pytest.mark.parametrize("engine", ["fused", "func", "double_backward"])
def test_deterministic_on_cuda(oracles, engine):
    results = []
    for _ in range(2):
        op = _cuda_operator(oracles, "conv_conv_groups_stride", engine, "hessian")
        block = oracles.random_block(op.dim, 8, seed=71, device="cuda")
        results += [op @ block, op @ block]
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_block_equals_singles_on_cuda(oracles):
    op = _cuda_operator(oracles, "conv_conv_groups_stride", "fused", "hessian")
    block = oracles.random_block(op.dim, 8, seed=73, device="cuda")
    singles = torch.stack([op @ block[:, j] for j in range(8)], dim=1)
    assert oracles.rel_err((op @ block).cpu(), singles.double().cpu()) <= 1e-6
