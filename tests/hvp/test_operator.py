"""``HessianOperator`` properties: blocks, symmetry, linearity, determinism, engine choice,
frozen and shared parameters, the counters and converters, and the one-call ``hvp``.

fp32 throughout. Tolerances: a block against its columns 1e-6 (the same rules in the same
precision, only GEMM shapes and so summation orders differ: a few ulp of each column's norm);
symmetry and linearity 1e-5 (the fp32 rounding of two separate products, as for the oracle).
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn

import imc_kernels
from imc_kernels import HessianOperator
from imc_kernels.hvp.double_backward import weight_norm_second_derivative_is_right

ENGINE_CURVATURES = [
    ("fused", "hessian"),
    ("fused", "ggn"),
    ("func", "hessian"),
    ("func", "ggn"),
    ("double_backward", "hessian"),
]
EC_IDS = [f"{e}-{c}" for e, c in ENGINE_CURVATURES]
ENGINES = ("fused", "func", "double_backward")
# One MLP and one CNN with two convolutions (the block paths of every conv term).
PROPERTY_CASES = ["mlp_gelu", "conv_conv_groups_stride"]


def _operator(oracles, case_name, engine="auto", curvature="hessian", **kwargs):
    model, loss_fn, batch = oracles.build_case(case_name)
    return HessianOperator(model, loss_fn, batch, engine=engine, curvature=curvature, **kwargs)


def _model_state(model):
    """Everything an operator must leave alone: parameter objects and values, grads, buffers."""
    return {
        "params": [(name, p, p.detach().clone()) for name, p in model.named_parameters()],
        "kinds": [type(p) for p in model.parameters()],
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }


def _assert_untouched(model, before):
    after = _model_state(model)
    assert [n for n, _, _ in after["params"]] == [n for n, _, _ in before["params"]]
    assert all(type(p) is nn.Parameter for p in model.parameters()), (
        f"parameters replaced by plain tensors: {after['kinds']}"
    )
    for (name, p_before, value), (_, p_after, _) in zip(before["params"], after["params"]):
        assert p_after is p_before, f"{name} was replaced"
        assert torch.equal(p_after.detach(), value), f"{name} changed"
        assert p_after.grad is None, f"{name}.grad was written"
    assert before["buffers"].keys() == after["buffers"].keys()
    assert all(torch.equal(before["buffers"][k], after["buffers"][k]) for k in before["buffers"])
    assert after["training"] == before["training"]


# ------------------------------------------------------------------- algebraic properties


@pytest.mark.parametrize("case_name", PROPERTY_CASES)
@pytest.mark.parametrize(("engine", "curvature"), ENGINE_CURVATURES, ids=EC_IDS)
def test_block_equals_stacked_singles(oracles, case_name, engine, curvature):
    op = _operator(oracles, case_name, engine, curvature)
    block = oracles.random_block(op.dim, 5, seed=3)
    together = op @ block
    singles = torch.stack([op @ block[:, j] for j in range(5)], dim=1)
    assert oracles.rel_err(together, singles) <= 1e-6


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_single_vector_products_written_in_place_are_independent(oracles, curvature):
    """The fused engine writes a single vector's weight products straight into that call's
    output: a later product (single or block) must not write into an earlier result, and the
    in-place result equals the copying path's (a block of two with the vector twice)."""
    op = _operator(oracles, "mlp_gelu", "fused", curvature)
    v = oracles.random_block(op.dim, 2, seed=31)
    first = op @ v[:, 0]
    kept = first.clone()
    second = op @ v[:, 1]
    op @ oracles.random_block(op.dim, 3, seed=32)
    assert torch.equal(first, kept)
    assert first.data_ptr() != second.data_ptr()
    pair = op @ torch.stack([v[:, 0], v[:, 0]], dim=1)
    assert oracles.rel_err(first, pair[:, 0]) <= 1e-6


@pytest.mark.parametrize("case_name", PROPERTY_CASES)
@pytest.mark.parametrize(("engine", "curvature"), ENGINE_CURVATURES, ids=EC_IDS)
def test_symmetry(oracles, case_name, engine, curvature):
    """``u . (H v) = v . (H u)`` for every pair of 4 random vectors: ``U^T H U`` is symmetric."""
    op = _operator(oracles, case_name, engine, curvature)
    block = oracles.random_block(op.dim, 4, seed=5)
    gram = block.double().T @ (op @ block).double()
    assert float((gram - gram.T).norm() / gram.norm()) <= 1e-5


@pytest.mark.parametrize(("engine", "curvature"), ENGINE_CURVATURES, ids=EC_IDS)
def test_linearity(oracles, engine, curvature):
    op = _operator(oracles, "conv_bn2d_affine_adaptive", engine, curvature)
    u, v = oracles.random_block(op.dim, 2, seed=7).unbind(1)
    combined = op @ (2.5 * u - 0.75 * v)
    expected = 2.5 * (op @ u).double() - 0.75 * (op @ v).double()
    assert oracles.rel_err(combined, expected) <= 1e-5


@pytest.mark.parametrize("engine", ENGINES)
def test_same_inputs_same_bits(oracles, engine):
    """Two operators from the same inputs, each applied twice: four identical results."""
    first = _operator(oracles, "conv_conv_groups_stride", engine)
    second = _operator(oracles, "conv_conv_groups_stride", engine)
    block = oracles.random_block(first.dim, 3, seed=11)
    results = [first @ block, first @ block, second @ block, second @ block]
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("engine", ENGINES)
def test_uninitialised_memory_is_never_read(oracles, engine):
    """``torch.empty`` filled with NaN (deterministic mode): an unwritten element would show."""
    op = _operator(oracles, "conv_groups2_nobias_maxpool_overlap", engine)
    block = oracles.random_block(op.dim, 3, seed=13)
    expected = op @ block
    with oracles.poisoned_empty():
        poisoned = _operator(oracles, "conv_groups2_nobias_maxpool_overlap", engine) @ block
    assert torch.isfinite(poisoned).all()
    assert oracles.rel_err(poisoned, expected) <= 1e-6


def test_non_contiguous_and_empty_blocks(oracles):
    op = _operator(oracles, "mlp_tanh")
    rows = oracles.random_block(op.dim, 3, seed=17).T.contiguous()  # (3, dim)
    assert not rows.T.is_contiguous()
    torch.testing.assert_close(op @ rows.T, op @ rows.T.contiguous(), rtol=0, atol=0)
    empty = op @ torch.zeros(op.dim, 0)
    assert empty.shape == (op.dim, 0)
    assert op.n_products == 6


# ------------------------------------------------------------------------ engine choice


class TwoBranch(nn.Module):
    """A custom module with its own forward: not a Sequential, so not for the fused walker."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)) * torch.sigmoid(self.b(x)))


def _fallback_problem(kind):
    gen = torch.Generator().manual_seed(21)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        if kind == "custom_module":
            model, loss_fn = TwoBranch(), nn.CrossEntropyLoss()
        elif kind == "layernorm":
            model = nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.SiLU(), nn.Linear(7, 3))
            loss_fn = nn.CrossEntropyLoss()
        else:  # a loss without a fused rule
            model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
            loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    batch = (torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
    return model, loss_fn, batch


FALLBACKS = {"custom_module": "TwoBranch", "layernorm": "LayerNorm", "loss": "label smoothing"}


def test_auto_picks_fused_for_supported_sequential(oracles):
    op = _operator(oracles, "conv_bn2d_affine_adaptive")
    assert op.engine == "fused"
    assert "fused" in repr(op)


@pytest.mark.parametrize("engine", ["auto", "fused", "func"])
def test_fused_engine_runs_the_model_forward_once(oracles, engine, monkeypatch):
    """With the fused engine the operator's checks read the engine's own primal forward: the
    module's forward never runs (it did, a second time, before), and the loss is the model's
    loss to fp32 rounding. Other engines still run it."""
    model, loss_fn, batch = oracles.build_case("mlp_gelu")
    calls = []
    sequential_forward = nn.Sequential.forward

    def counted_forward(self, *args):
        calls.append(1)
        return sequential_forward(self, *args)

    # Counted through the class, not a forward hook: the fused engine refuses hooked models.
    monkeypatch.setattr(nn.Sequential, "forward", counted_forward)
    op = HessianOperator(model, loss_fn, batch, engine=engine)
    monkeypatch.undo()
    with torch.no_grad():
        want = loss_fn(model(batch[0]), batch[1])
    assert (len(calls) == 0) == (op.engine == "fused")
    torch.testing.assert_close(op.loss, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", list(FALLBACKS))
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_auto_falls_back_to_func_and_is_right(oracles, kind, curvature):
    model, loss_fn, batch = _fallback_problem(kind)
    # torch.func.hessian is wrong for LayerNorm (see oracles.dense_hessian): unbatched oracle.
    reference = oracles.dense(curvature, model, loss_fn, batch, vectorize=kind != "layernorm")
    op = HessianOperator(model, loss_fn, batch, curvature=curvature)
    assert op.engine == "func"
    assert FALLBACKS[kind] in op.engine_reason
    block = oracles.random_block(op.dim, 3, seed=23)
    assert oracles.rel_err(op @ block, reference @ block.double()) <= 1e-5


def test_auto_picks_func_in_train_mode(oracles):
    model, loss_fn, batch = oracles.build_case("mlp_tanh")
    op = HessianOperator(model, loss_fn, batch, mode="train")
    assert op.engine == "func"
    assert "train" in op.engine_reason


@pytest.mark.parametrize("kind", list(FALLBACKS))
def test_fused_refuses_unsupported_models(kind):
    model, loss_fn, batch = _fallback_problem(kind)
    with pytest.raises(ValueError, match=f"engine='fused'.*{FALLBACKS[kind]}"):
        HessianOperator(model, loss_fn, batch, engine="fused")


class ScaledSequential(nn.Sequential):
    """A Sequential subclass with its own forward: the walker would skip the scaling."""

    def forward(self, x):
        return super().forward(3.0 * x) ** 2


class SquareTanh(nn.Tanh):
    """A Tanh subclass computing something else: the Tanh rule would be wrong."""

    def forward(self, x):
        return x * x


def _custom_code_problem(kind):
    """``(model, loss_fn, batch, cleanup)``: a Sequential of supported layer types whose
    forward differs from what the fused rules compute; ``cleanup()`` removes global hooks."""
    gen = torch.Generator().manual_seed(61)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(61)
        layers = [nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)]
        if kind == "sequential_subclass":
            model = ScaledSequential(*layers)
        else:
            if kind == "activation_subclass":
                layers[1] = SquareTanh()
            model = nn.Sequential(*layers)
    batch = (torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
    handle = None
    if kind == "forward_hook":
        handle = model[0].register_forward_hook(lambda module, args, out: 2.0 * out)
    elif kind == "forward_pre_hook":
        handle = model.register_forward_pre_hook(lambda module, args: (0.5 * args[0],))
    elif kind == "instance_forward":
        model[1].forward = torch.sin
    elif kind == "global_forward_hook":
        handle = nn.modules.module.register_module_forward_hook(
            lambda module, args, out: 2.0 * out if isinstance(module, nn.Tanh) else None
        )
    elif kind == "global_forward_pre_hook":
        handle = nn.modules.module.register_module_forward_pre_hook(
            lambda module, args: (0.5 * args[0],) if isinstance(module, nn.Linear) else None
        )
    cleanup = handle.remove if handle is not None else lambda: None
    return model, nn.CrossEntropyLoss(), batch, cleanup


# The model code the fused rules would skip, and what the engine reason names.
CUSTOM_CODE = {
    "sequential_subclass": r"ScaledSequential \(the model\) \(overrides Sequential.forward",
    "activation_subclass": r"SquareTanh '1' \(overrides Tanh.forward",
    "instance_forward": r"Tanh '1' \(forward replaced on the instance",
    "forward_hook": r"Linear '0' \(has a forward hook",
    "forward_pre_hook": r"Sequential \(the model\) \(has a forward pre-hook",
    "global_forward_hook": r"global module forward hooks",
    "global_forward_pre_hook": r"global module forward pre-hooks",
}


@pytest.mark.parametrize("kind", list(CUSTOM_CODE))
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_auto_runs_custom_forward_code_exactly(oracles, kind, curvature):
    """Hooks and forwards of their own change the function: engine='auto' must not pick the
    fused rules, which skip them (they did, 30-150 % off), and the products must be the
    Hessian of what the model computes."""
    model, loss_fn, batch, cleanup = _custom_code_problem(kind)
    try:
        reference = oracles.dense(curvature, model, loss_fn, batch)
        op = HessianOperator(model, loss_fn, batch, curvature=curvature)
        assert op.engine == "func"
        assert re.search(CUSTOM_CODE[kind], op.engine_reason), op.engine_reason
        block = oracles.random_block(op.dim, 3, seed=67)
        assert oracles.rel_err(op @ block, reference @ block.double()) <= 1e-5
    finally:
        cleanup()


@pytest.mark.parametrize("kind", list(CUSTOM_CODE))
def test_fused_refuses_custom_forward_code(kind):
    model, loss_fn, batch, cleanup = _custom_code_problem(kind)
    try:
        with pytest.raises(ValueError, match="engine='fused' cannot run.*" + CUSTOM_CODE[kind]):
            HessianOperator(model, loss_fn, batch, engine="fused")
    finally:
        cleanup()


def test_subclass_keeping_the_forward_stays_fused(oracles):
    """A subclass that only adds attributes or methods computes what its base computes."""

    class NamedTanh(nn.Tanh):
        def describe(self):
            return "tanh"

    model, loss_fn, batch, _ = _custom_code_problem("plain")
    model[1] = NamedTanh()
    reference = oracles.dense("hessian", model, loss_fn, batch)
    op = HessianOperator(model, loss_fn, batch)
    assert op.engine == "fused", op.engine_reason
    block = oracles.random_block(op.dim, 2, seed=71)
    assert oracles.rel_err(op @ block, reference @ block.double()) <= 1e-5


def _reparametrized_problem(kind):
    model, loss_fn, batch, _ = _custom_code_problem("plain")
    if kind == "weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated for parametrizations
            model[0] = nn.utils.weight_norm(model[0])
    else:  # the same parameters, registered in the order (bias, weight)
        weight = model[0].weight
        del model[0].weight
        model[0].register_parameter("weight", weight)
    return model, loss_fn, batch


@pytest.mark.parametrize("kind", ["weight_norm", "reordered"])
def test_reparametrized_weights_are_not_fused(oracles, kind):
    """Old-style weight_norm (weight_g, weight_v) crashed the fused Linear rule with a
    reshape error, and so did parameters out of the (weight, bias) order the rules pair
    tangents with; auto now takes an exact engine."""
    model, loss_fn, batch = _reparametrized_problem(kind)
    names = ["bias", "weight_g", "weight_v"] if kind == "weight_norm" else ["bias", "weight"]
    with pytest.raises(ValueError, match=re.escape("Linear '0' ") + ".*" + re.escape(str(names))):
        HessianOperator(model, loss_fn, batch, engine="fused")
    if kind == "weight_norm" and not weight_norm_second_derivative_is_right():
        # No engine is exact: forward-mode AD has no rule for weight_norm's kernel, and
        # torch's double backward of it fails gradgradcheck (a silently wrong Hessian).
        for engine in ("auto", "func", "double_backward"):
            with pytest.raises(NotImplementedError, match=r"weight norm on 0\.weight.*fold"):
                HessianOperator(model, loss_fn, batch, engine=engine)
        return
    op = HessianOperator(model, loss_fn, batch)
    assert op.engine == "func" and str(names) in op.engine_reason
    block = oracles.random_block(op.dim, 3, seed=73)
    reference = oracles.dense("hessian", model, loss_fn, batch)
    assert oracles.rel_err(op @ block, reference @ block.double()) <= 1e-5


def test_weight_norm_second_derivative_check():
    """The check behind the refusal above: torch 2.13's torch._weight_norm fails
    gradgradcheck (an analytic second derivative that disagrees with finite differences),
    while the same function written out passes it."""
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)

    def written_out(v, g):
        return v * (g / v.norm(dim=1, keepdim=True))

    assert torch.autograd.gradgradcheck(written_out, (v, g))
    kernel = torch.autograd.gradgradcheck(
        lambda v, g: torch._weight_norm(v, g, 0), (v, g), raise_exception=False
    )
    assert weight_norm_second_derivative_is_right() == kernel


def test_new_style_weight_norm_is_refused_too():
    model, loss_fn, batch, _ = _custom_code_problem("plain")
    nn.utils.parametrizations.weight_norm(model[2])
    if weight_norm_second_derivative_is_right():
        pytest.skip("this torch differentiates weight norm twice correctly")
    with pytest.raises(NotImplementedError, match=r"weight norm on 2\.weight"):
        HessianOperator(model, loss_fn, batch, engine="double_backward")


# ------------------------------------------------------------ frozen and shared parameters


def _frozen_model(kind):
    """``(model, loss_fn, batch)`` with some parameters frozen (requires_grad False)."""
    gen = torch.Generator().manual_seed(31)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(31)
        if kind.startswith("mlp"):
            model = nn.Sequential(
                nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.GELU(), nn.Linear(6, 3)
            )
            x = torch.randn(7, 5, generator=gen)
        else:
            model = nn.Sequential(
                nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(27, 3),
            )  # fmt: skip
            bn = model[1]
            with torch.no_grad():
                bn.running_mean.copy_(0.2 * torch.randn(3, generator=gen))
                bn.running_var.copy_(0.5 + torch.rand(3, generator=gen))
                bn.weight.copy_(1 + 0.3 * torch.randn(3, generator=gen))
            x = torch.randn(6, 2, 6, 6, generator=gen)
    model.eval()
    if kind == "mlp_first_weight":
        model[0].weight.requires_grad_(False)
    elif kind == "mlp_first_layer":
        model[0].requires_grad_(False)
    elif kind == "mlp_middle_weight":
        model[2].weight.requires_grad_(False)
    elif kind == "cnn_conv_and_bn_bias":
        model[0].requires_grad_(False)
        model[1].bias.requires_grad_(False)
    elif kind == "cnn_bn_weight":
        model[1].weight.requires_grad_(False)
    targets = torch.randint(0, 3, (x.shape[0],), generator=gen)
    return model, nn.CrossEntropyLoss(), (x, targets)


FROZEN = [
    "mlp_first_weight",
    "mlp_first_layer",
    "mlp_middle_weight",
    "cnn_conv_and_bn_bias",
    "cnn_bn_weight",
]


@pytest.mark.parametrize("kind", FROZEN)
@pytest.mark.parametrize(("engine", "curvature"), ENGINE_CURVATURES, ids=EC_IDS)
def test_frozen_parameters_are_excluded(oracles, kind, engine, curvature):
    model, loss_fn, batch = _frozen_model(kind)
    reference = oracles.dense(curvature, model, loss_fn, batch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < sum(p.numel() for p in model.parameters())
    op = HessianOperator(model, loss_fn, batch, engine=engine, curvature=curvature)
    assert op.dim == trainable == reference.shape[0]
    block = oracles.random_block(op.dim, 3, seed=37)
    assert oracles.rel_err(op @ block, reference @ block.double()) <= 1e-5


def _shared_model(kind):
    gen = torch.Generator().manual_seed(41)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(41)
        shared = nn.Linear(6, 6)
        second = shared if kind == "module_twice" else nn.Linear(6, 6)
        model = nn.Sequential(
            nn.Linear(5, 6), nn.Tanh(), shared, nn.Sigmoid(), second, nn.Tanh(), nn.Linear(6, 3)
        )
    if kind == "weight_attribute":
        second.weight = shared.weight  # tied weight, separate biases
    batch = (torch.randn(7, 5, generator=gen), torch.randint(0, 3, (7,), generator=gen))
    return model.eval(), nn.CrossEntropyLoss(), batch


@pytest.mark.parametrize("kind", ["module_twice", "weight_attribute"])
@pytest.mark.parametrize(("engine", "curvature"), ENGINE_CURVATURES, ids=EC_IDS)
def test_shared_parameter_matches_oracle(oracles, kind, engine, curvature):
    """A Linear used twice in a Sequential, or a weight tied between two Linears: one slot in
    the flat vector, both uses count, and the model is left as it was."""
    model, loss_fn, batch = _shared_model(kind)
    reference = oracles.dense(curvature, model, loss_fn, batch)
    before = _model_state(model)
    op = HessianOperator(model, loss_fn, batch, engine=engine, curvature=curvature)
    assert op.dim == 36 + 42 + 21 + (6 if kind == "weight_attribute" else 0) == reference.shape[0]
    block = oracles.random_block(op.dim, 3, seed=43)
    assert oracles.rel_err(op @ block, reference @ block.double()) <= 1e-5
    # A single vector takes the fused engine's in-place output path, which must leave the
    # shared parameter's product to the sum of both uses.
    vector = block[:, 0]
    assert oracles.rel_err(op @ vector, reference @ vector.double()) <= 1e-5
    _assert_untouched(model, before)


@pytest.mark.parametrize(("engine", "curvature"), ENGINE_CURVATURES, ids=EC_IDS)
def test_operator_leaves_model_untouched(oracles, engine, curvature):
    model, loss_fn, batch = oracles.build_case("conv_bn2d_affine_adaptive")
    model.train()
    model[0][1].eval()  # mixed flags must come back exactly as they were
    before = _model_state(model)
    with pytest.warns(UserWarning, match="eval mode"):
        op = HessianOperator(model, loss_fn, batch, engine=engine, curvature=curvature)
    op @ oracles.random_block(op.dim, 2)
    _assert_untouched(model, before)


# ------------------------------------------------------------- counters and converters


def test_n_products_counts_vectors(oracles):
    op = _operator(oracles, "mlp_silu")
    assert op.n_products == 0
    op @ oracles.random_block(op.dim, 3)
    assert op.n_products == 3
    op @ oracles.random_block(op.dim, 1)[:, 0]
    op.matvec(oracles.random_block(op.dim, 1)[:, 0])
    op.matmat(oracles.random_block(op.dim, 8))
    assert op.n_products == 13


def test_matvec_shape(oracles):
    op = _operator(oracles, "mlp_silu")
    v = oracles.random_block(op.dim, 1)[:, 0]
    out = op.matvec(v)
    assert out.shape == (op.dim,) and out.dtype == torch.float32
    torch.testing.assert_close(out, (op @ v[:, None])[:, 0], rtol=1e-6, atol=0)
    assert op.shape == (op.dim, op.dim) and op.dtype == torch.float32
    assert op.device == torch.device("cpu")
    with pytest.raises(ValueError, match="matvec takes a vector"):
        op.matvec(v[:, None])


def test_as_params(oracles):
    model, loss_fn, batch = oracles.build_case("conv_bn2d_affine_adaptive")
    model[0][0].bias.requires_grad_(False)
    op = HessianOperator(model, loss_fn, batch)
    v = torch.arange(op.dim, dtype=torch.float32)
    pieces = op.as_params(v)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert list(pieces) == [n for n, _ in named]
    offset = 0
    for name, p in named:
        assert pieces[name].shape == p.shape
        torch.testing.assert_close(pieces[name].reshape(-1), v[offset : offset + p.numel()])
        offset += p.numel()
    assert offset == op.dim
    with pytest.raises(ValueError, match="length"):
        op.as_params(v[:-1])


def test_to_scipy(oracles):
    np = pytest.importorskip("numpy")
    pytest.importorskip("scipy")
    op = _operator(oracles, "conv_stride2_pad1")
    lin = op.to_scipy()
    assert lin.shape == (op.dim, op.dim) and lin.dtype == np.float64
    block = oracles.random_block(op.dim, 3, seed=47)
    x = block.double().numpy()  # fp32 values in fp64: the conversion back is exact
    # The same products as the operator's own (a vector is a block of one): the same bits.
    np.testing.assert_array_equal(lin.matvec(x[:, 0]), (op @ block[:, :1]).double().numpy()[:, 0])
    np.testing.assert_array_equal(lin.matmat(x), (op @ block).double().numpy())
    np.testing.assert_array_equal(lin @ x, (op @ block).double().numpy())
    np.testing.assert_array_equal(lin.rmatvec(x[:, 0]), lin.matvec(x[:, 0]))  # symmetric


def test_to_scipy_refuses_complex_vectors(oracles):
    """The operator is real: casting a complex vector dropped its imaginary part silently."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("scipy")
    op = _operator(oracles, "mlp_gelu")
    lin = op.to_scipy()
    vector = np.ones(op.dim) * (1 + 1j)
    with pytest.raises(TypeError, match="real vectors, got complex128.*x.real and x.imag"):
        lin.matvec(vector)
    with pytest.raises(TypeError, match="complex"):
        lin.matmat(np.stack([vector, vector], axis=1))


def test_one_call_hvp(oracles):
    assert imc_kernels.hvp.HessianOperator is HessianOperator
    assert imc_kernels.HessianOperator is HessianOperator
    model, loss_fn, batch = oracles.build_case("conv_same_maxpool_ceil")
    reference = oracles.dense("ggn", model, loss_fn, batch)
    op = HessianOperator(copy.deepcopy(model), loss_fn, batch)
    v = oracles.random_block(op.dim, 1, seed=53)[:, 0]
    out = imc_kernels.hvp(model, loss_fn, batch, v)
    assert out.shape == (op.dim,)
    torch.testing.assert_close(out, op @ v, rtol=0, atol=0)
    block = oracles.random_block(op.dim, 3, seed=59)
    ggn = imc_kernels.hvp(model, loss_fn, batch, block, curvature="ggn", engine="func")
    assert oracles.rel_err(ggn, reference @ block.double()) <= 1e-5


def test_auto_falls_back_to_double_backward_when_func_cannot_differentiate():
    """Huber loss has no forward-mode rule (huber_loss_backward), which auto's module-based
    choice of func cannot see; the first product finds out and auto continues with
    double_backward instead of failing. Checked against a reverse-over-reverse dense Hessian
    of the loss in the flat parameters (torch.autograd.functional.hessian)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    loss_fn = nn.HuberLoss(delta=0.5)
    op = HessianOperator(model, loss_fn, (x, y))
    assert op.engine == "func", op.engine_reason
    v = torch.randn(op.dim, 3, dtype=torch.float64)
    hv = op @ v
    assert op.engine == "double_backward" and "huber" in op.engine_reason

    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta):
        pieces = torch.split(theta, [math.prod(s) for s in shapes])
        state = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return loss_fn(torch.func.functional_call(model, state, (x,)), y)

    dense = torch.autograd.functional.hessian(loss_of, flat)
    assert torch.allclose(hv, dense @ v, rtol=1e-10, atol=1e-12)
    assert torch.allclose(op @ v[:, 0], dense @ v[:, 0], rtol=1e-10, atol=1e-12)
    # Asked for by name, func keeps its clear error; GGN has no double_backward to fall to.
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        HessianOperator(model, loss_fn, (x, y), engine="func") @ v
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        HessianOperator(model, loss_fn, (x, y), curvature="ggn") @ v
