"""Every engine and curvature against the dense fp64 oracle, on the whole model catalogue.

Tolerances (worst column's ``||Hv - H_ref v|| / ||H_ref v||``):

* fp32 model: 1e-5. The engines round every op to fp32 (unit roundoff 6e-8); the error grows
  with the depth of the chain (forward, tangent forward, tangent backward: ~10 roundings per
  layer) and with cancellation in the sums of mixed-sign second-order terms. Measured worst
  case over the catalogue: 5e-7, so 1e-5 leaves a 20x margin for other BLAS and reduction
  orders, and still catches a wrong rule, which is off by O(1).
* fp64 model: 1e-10. Unit roundoff 1.1e-16, the same growth gives ~2e-15 (measured); a rule
  computed in fp32 anywhere in an fp64 run would show as ~1e-7.

Blocks of b = 1 (the single-vector paths), 3 (odd) and 8 go through the same operator.
"""

from __future__ import annotations

import pytest
import torch

from imc_kernels import HessianOperator

ENGINE_CURVATURES = [
    ("fused", "hessian"),
    ("fused", "ggn"),
    ("func", "hessian"),
    ("func", "ggn"),
    ("double_backward", "hessian"),
]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
BLOCKS = (1, 3, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    ("engine", "curvature"), ENGINE_CURVATURES, ids=[f"{e}-{c}" for e, c in ENGINE_CURVATURES]
)
def test_matches_dense_oracle(case_name, engine, curvature, dtype, oracles, dense_oracle):
    reference = dense_oracle(case_name, curvature)
    model, loss_fn, batch = oracles.build_case(case_name)
    model, batch = oracles.cast(model, batch, dtype)
    op = HessianOperator(model, loss_fn, batch, engine=engine, curvature=curvature)
    assert op.engine == engine
    assert op.dim == reference.shape[0] == sum(p.numel() for p in model.parameters())
    for b in BLOCKS:
        block = oracles.random_block(op.dim, b, dtype, seed=b)
        out = op @ block
        assert out.shape == (op.dim, b) and out.dtype == dtype
        err = oracles.rel_err(out, reference @ block.double())
        assert err <= TOLERANCE[dtype], f"b={b}: relative error {err:.2e}"


@pytest.mark.parametrize("case_name", ["mlp_tanh", "conv_conv_groups_stride"])
def test_ggn_differs_from_hessian(case_name, oracles, dense_oracle):
    """Guards the curvature flag: on these models the Hessian is not the GGN (by > 1e-3)."""
    hess, ggn = dense_oracle(case_name, "hessian"), dense_oracle(case_name, "ggn")
    assert float((hess - ggn).norm() / hess.norm()) > 1e-3
    model, loss_fn, batch = oracles.build_case(case_name)
    block = oracles.random_block(hess.shape[0], 3)
    for engine in ("fused", "func"):
        out = HessianOperator(model, loss_fn, batch, engine=engine, curvature="ggn") @ block
        assert oracles.rel_err(out, ggn @ block.double()) <= 1e-5
        assert oracles.rel_err(out, hess @ block.double()) > 1e-4
