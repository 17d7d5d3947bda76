"""An input convolution followed by max pooling, run on pooled patches
(``Conv2dRule.absorb_max_pool``, ``IMC_CONV_POOL_PATCHES``) against the dense fp64 oracle and
against the convolution path.

Which catalogue models take it: ``auto`` (the CPU default) within the size ratio limit,
``on`` past it, ``off`` never, nor any model whose first layer with parameters is not a
convolution directly followed (after the engine's activation/pool reordering) by MaxPool2d.

Tolerances: the oracle bounds of ``test_engines_vs_oracle.py`` (fp32 1e-5, fp64 1e-10). The
patch path sums the weight products over samples and pooled positions in one GEMM instead of
a convolution over a zero-filled full-resolution tangent: other rounding, same values. A
patch gathered at the wrong position, a transposed tap order or a dropped bias is off by
O(1e-1).
"""

from __future__ import annotations

import pytest
import torch

from imc_kernels import HessianOperator
from imc_kernels.hvp.layers import conv2d
from imc_kernels.hvp.layers.activation import ActivationRule

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
BLOCKS = (1, 3)

# Taken with the default (auto) limit on the CPU.
WITHIN_LIMIT = [
    "input_conv_relu_maxpool",
    "input_conv_dilated_sigmoid_maxpool_overlap",
    "input_conv_stride2_maxpool",
    "maxpool_pad_dilation",
]
# Convolution then (commuted activation and) max pool, but more patch values per output value
# than the auto limit: two input channels under 2x2 windows, overlapping stride-1 windows.
PAST_LIMIT = ["conv_relu_maxpool_twice", "conv_sigmoid_maxpool_pad_overlap"]
# Never: the pool follows an activation that does not commute with it (GELU, negative-slope
# LeakyReLU, SiLU), a grouped convolution, the pool before the convolution, no pool at all.
NEVER = [
    "conv_same_maxpool_ceil",
    "conv_leaky_negative_slope_maxpool",
    "conv_groups2_nobias_maxpool_overlap",
    "pool_first",
    "conv_stride2_pad1",
]


def _operator(oracles, case_name, dtype=torch.float32, curvature="hessian", prepare=None):
    model, loss_fn, batch = oracles.build_case(case_name)
    model, batch = oracles.cast(model, batch, dtype)
    if prepare is not None:
        prepare(model)
    return HessianOperator(model, loss_fn, batch, engine="fused", curvature=curvature)


def _absorbed(op: HessianOperator) -> bool:
    return any(
        isinstance(rule, conv2d.Conv2dRule) and rule.patches is not None
        for rule in op._engine.rules
    )


def _absorbed_activation(op: HessianOperator) -> bool:
    return any(isinstance(rule, ActivationRule) and rule.absorbed for rule in op._engine.rules)


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
@pytest.mark.parametrize("case_name", WITHIN_LIMIT + PAST_LIMIT + NEVER)
def test_which_models_take_patches(case_name, mode, oracles, monkeypatch):
    monkeypatch.setenv(conv2d.ENV_POOL_PATCHES, mode)
    expected = {
        "auto": case_name in WITHIN_LIMIT,
        "on": case_name in WITHIN_LIMIT + PAST_LIMIT,
        "off": False,
    }[mode]
    assert _absorbed(_operator(oracles, case_name)) == expected


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("case_name", WITHIN_LIMIT + PAST_LIMIT)
def test_which_activations_are_folded_in(case_name, curvature, oracles, monkeypatch):
    """The activation after the pool goes into the patches when its tangent passes are a
    product with act'(z) alone: (Leaky)ReLU always, Sigmoid and Tanh for the GGN only."""
    monkeypatch.setenv(conv2d.ENV_POOL_PATCHES, "on")
    op = _operator(oracles, case_name, curvature=curvature)
    kinds = [r.kind for r in op._engine.rules if isinstance(r, ActivationRule)]
    piecewise_linear = kinds[0] in ("relu", "leaky_relu")
    assert _absorbed_activation(op) == (piecewise_linear or curvature == "ggn")
    monkeypatch.setenv(conv2d.ENV_POOL_PATCHES, "off")
    assert not _absorbed_activation(_operator(oracles, case_name, curvature=curvature))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("case_name", WITHIN_LIMIT + PAST_LIMIT)
def test_patches_match_dense_oracle(
    case_name, curvature, dtype, oracles, dense_oracle, monkeypatch
):
    monkeypatch.setenv(conv2d.ENV_POOL_PATCHES, "on")
    reference = dense_oracle(case_name, curvature)
    op = _operator(oracles, case_name, dtype, curvature)
    assert _absorbed(op)
    for b in (*BLOCKS, 1):  # back to b = 1 after b = 3: kept buffers of another shape
        block = oracles.random_block(op.dim, b, dtype, seed=b)
        err = oracles.rel_err(op @ block, reference @ block.double())
        assert err <= TOLERANCE[dtype], f"b={b}: relative error {err:.2e}"


@pytest.mark.parametrize("frozen", ["weight", "bias"], ids=["frozen-weight", "frozen-bias"])
def test_frozen_parameter(frozen, oracles, monkeypatch):
    """A frozen weight (only the bias tangent reaches the pool) or bias: the patch path and
    the convolution path give the same products over the trainable parameters."""

    def freeze(model):
        getattr(model[0][0], frozen).requires_grad_(False)

    results = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(conv2d.ENV_POOL_PATCHES, mode)
        op = _operator(oracles, "input_conv_relu_maxpool", torch.float64, prepare=freeze)
        assert _absorbed(op) == (mode == "on")
        block = oracles.random_block(op.dim, 3, torch.float64, seed=5)
        results[mode] = op @ block
    assert oracles.rel_err(results["on"], results["off"]) <= TOLERANCE[torch.float64]


def test_workspace_budget_refuses_patches(oracles, monkeypatch):
    """The patch matrix is kept in the operator's workspace: a budget it does not fit keeps
    the convolution path (same products)."""
    monkeypatch.setenv(conv2d.ENV_POOL_PATCHES, "on")
    monkeypatch.setenv("IMC_HVP_WORKSPACE_BYTES", "0")
    op = _operator(oracles, "input_conv_relu_maxpool")
    assert not _absorbed(op)
    monkeypatch.delenv("IMC_HVP_WORKSPACE_BYTES")
    with_patches = _operator(oracles, "input_conv_relu_maxpool")
    assert _absorbed(with_patches)
    block = oracles.random_block(op.dim, 3, seed=2)
    assert oracles.rel_err(op @ block, with_patches @ block) <= TOLERANCE[torch.float32]


def test_bad_setting_is_named(oracles, monkeypatch):
    monkeypatch.setenv(conv2d.ENV_POOL_PATCHES, "yes")
    with pytest.raises(ValueError, match="IMC_CONV_POOL_PATCHES='yes' is not one of"):
        _operator(oracles, "input_conv_relu_maxpool")


def test_auto_is_off_on_other_devices():
    assert conv2d.pool_patch_ratio_limit(torch.device("cpu")) == conv2d.PATCH_RATIO_LIMIT
    assert conv2d.pool_patch_ratio_limit(torch.device("meta")) is None
