"""Masked optimizers and layers (imc_kernels.masked) against torch.optim and dense layers.

Every optimizer test runs with both backends of the fused step: the pure-PyTorch twin and the
Triton kernel (in the interpreter on CPU), forced through ``IMC_KERNELS_BACKEND``.

Oracle: ``torch.optim.<same>(foreach=False)`` after ``p.grad.mul_(mask)``, followed by
``p.data.mul_(mask)``, with the pruned weights zeroed at the start.

Tolerances. The twin runs torch's single-tensor ops in torch's order, so it equals the oracle
bit for bit on CPU (asserted). The kernel rounds at most one extra time per operation (ATen's
vectorised loops fuse ``a + alpha * b`` into an FMA; the interpreter does not), so one step
agrees to a few ulp, ``1e-6`` in fp32 (eps 1.2e-7). Over ``T`` steps these differences add in
the parameters (the state contracts by ``beta < 1``): with synthetic gradients the bound is
``T * 1e-6``. With gradients from backward the trajectories also feed back through the loss;
for the small learning rates here (a step changes the weights by ~1e-2) that amplification is
O(1) over 20 steps, so the same ``T * 1e-6`` bound, doubled, holds with room.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imc_kernels import _dispatch
from imc_kernels.masked import (
    MaskedAdam,
    MaskedAdamW,
    MaskedConv2d,
    MaskedLinear,
    MaskedSGD,
    mask_model,
)

BACKENDS = ["reference", "triton"]
OPTIMIZERS = {
    "sgd": (MaskedSGD, torch.optim.SGD, dict(lr=0.01)),
    "sgd_momentum_wd": (
        MaskedSGD,
        torch.optim.SGD,
        dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    ),
    "sgd_nesterov": (
        MaskedSGD,
        torch.optim.SGD,
        dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3),
    ),
    "adam_l2": (MaskedAdam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    "adamw": (MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(_dispatch.ENV_BACKEND, request.param)
    return request.param


def _aligned_model():
    # Weight sizes 1024 and 512: whole blocks of the kernel.
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))


def _awkward_model():
    # Sizes 135, 5, 875, 7: no block boundary lines up with a parameter boundary.
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.Tanh(), nn.Flatten(), nn.Linear(125, 7))


MODELS = {"aligned": (_aligned_model, (32,)), "awkward": (_awkward_model, (3, 7, 7))}


def _build(shape_name, seed=0):
    factory, input_shape = MODELS[shape_name]
    torch.manual_seed(seed)
    return factory(), input_shape


def _masks(model, seed=1, keep=0.5):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=gen) < keep
        for name, p in model.named_parameters()
        if name.endswith("weight")
    }


def _batch(input_shape, step, n=8):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, *input_shape, generator=gen), torch.randn(n, generator=gen)


def _loss(model, x, y):
    return F.mse_loss(model(x).sum(dim=1), y)


class _TorchOracle:
    """torch.optim plus mask multiplications: the contract of the masked optimizers."""

    def __init__(self, model, masks, torch_cls, hyperparameters):
        self.model, self.masks = model, masks
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in masks:
                    p.mul_(masks[name])
        self.opt = torch_cls(model.parameters(), foreach=False, **hyperparameters)

    def step(self):
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in self.masks and p.grad is not None:
                    p.grad.mul_(self.masks[name])
        self.opt.step()
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in self.masks:
                    p.mul_(self.masks[name])


def _assert_params(actual_model, expected_model, exact, tol):
    for (name, a), (_, b) in zip(
        actual_model.named_parameters(), expected_model.named_parameters()
    ):
        # A diverged run (NaN on both sides) would compare equal-ish and prove nothing.
        assert torch.isfinite(b).all(), f"{name}: the torch.optim oracle diverged"
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


def _assert_pruned_zero(model, masks):
    for name, p in model.named_parameters():
        if name in masks:
            assert torch.equal(p[~masks[name]], torch.zeros(int((~masks[name]).sum()))), name


def _flat_state(opt):
    return [t for state in opt.state.values() for t in state.values() if t.dim() > 0]


# --- Equality with torch.optim ---------------------------------------------------------------


@pytest.mark.parametrize("shape_name", list(MODELS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_matches_torch_optim_synthetic_gradients(optimizer, shape_name, backend):
    # 25 steps with gradients drawn independently of the weights: the optimizer arithmetic
    # alone. Gradients are written both ways a user can (into the view, and as a new tensor),
    # and the learning rate changes at step 12 as a scheduler would.
    masked_cls, torch_cls, hp = OPTIMIZERS[optimizer]
    model, _ = _build(shape_name)
    oracle_model = copy.deepcopy(model)
    masks = _masks(model)
    opt = masked_cls.from_model(model, masks, **hp)
    oracle = _TorchOracle(oracle_model, masks, torch_cls, hp)
    steps = 25
    gen = torch.Generator().manual_seed(7)
    for t in range(steps):
        if t == 12:
            for group in opt.param_groups + oracle.opt.param_groups:
                group["lr"] *= 0.5
        for p, q in zip(model.parameters(), oracle_model.parameters()):
            grad = torch.randn(p.shape, generator=gen)
            if t % 2:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
            q.grad = grad
        opt.step()
        oracle.step()
        _assert_pruned_zero(model, masks)
    _assert_params(model, oracle_model, exact=backend == "reference", tol=steps * 1e-6)


@pytest.mark.parametrize("shape_name", list(MODELS))
@pytest.mark.parametrize("optimizer", ["sgd_nesterov", "adam_l2", "adamw"])
def test_training_matches_torch_optim(optimizer, shape_name, backend):
    # 20 steps of a real loop: zero_grad, backward (autograd accumulating into the views of
    # the flat gradient buffer), step.
    masked_cls, torch_cls, hp = OPTIMIZERS[optimizer]
    model, input_shape = _build(shape_name)
    oracle_model = copy.deepcopy(model)
    masks = _masks(model)
    opt = masked_cls.from_model(model, masks, **hp)
    oracle = _TorchOracle(oracle_model, masks, torch_cls, hp)
    steps = 20
    for t in range(steps):
        x, y = _batch(input_shape, t)
        opt.zero_grad()
        oracle.opt.zero_grad()
        _loss(model, x, y).backward()
        _loss(oracle_model, x, y).backward()
        opt.step()
        oracle.step()
    _assert_params(model, oracle_model, exact=backend == "reference", tol=2 * steps * 1e-6)
    _assert_pruned_zero(model, masks)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_no_masks_equals_torch_optim(optimizer, backend):
    masked_cls, torch_cls, hp = OPTIMIZERS[optimizer]
    model, input_shape = _build("awkward")
    oracle_model = copy.deepcopy(model)
    opt = masked_cls(model.parameters(), **hp)
    oracle = torch_cls(oracle_model.parameters(), foreach=False, **hp)
    steps = 20
    for t in range(steps):
        x, y = _batch(input_shape, t)
        for m, o in ((model, opt), (oracle_model, oracle)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
    _assert_params(model, oracle_model, exact=backend == "reference", tol=2 * steps * 1e-6)


def test_param_groups_match_torch_optim(backend):
    # Two groups with their own hyperparameters (one flat buffer each); masks are aligned
    # with the parameters of all groups in order.
    model, input_shape = _build("aligned")
    oracle_model = copy.deepcopy(model)
    masks = _masks(model)
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    opt = MaskedAdam(
        [{"params": params[:2], "lr": 3e-2}, {"params": params[2:], "weight_decay": 0.1}],
        [masks.get(name) for name in names],
        lr=1e-2,
    )
    oracle = _TorchOracle(oracle_model, masks, torch.optim.Adam, dict(lr=1e-2))
    oracle_params = list(oracle_model.parameters())
    oracle.opt = torch.optim.Adam(
        [
            {"params": oracle_params[:2], "lr": 3e-2},
            {"params": oracle_params[2:], "weight_decay": 0.1},
        ],
        lr=1e-2,
        foreach=False,
    )
    for t in range(10):
        x, y = _batch(input_shape, t)
        for m, o in ((model, opt), (oracle_model, oracle.opt)):
            o.zero_grad()
            _loss(m, x, y).backward()
        opt.step()
        oracle.step()
    _assert_params(model, oracle_model, exact=backend == "reference", tol=20e-6)
    _assert_pruned_zero(model, masks)


def test_parameter_without_grad_is_skipped_like_torch(backend):
    # torch.optim skips a parameter whose .grad is None (no weight decay, no momentum, no step
    # count); the fused step must split its launch around it.
    model, _ = _build("aligned")
    oracle_model = copy.deepcopy(model)
    masks = _masks(model)
    hp = dict(lr=1e-2, weight_decay=0.1)
    opt = MaskedAdam.from_model(model, masks, **hp)
    oracle = _TorchOracle(oracle_model, masks, torch.optim.Adam, hp)
    gen = torch.Generator().manual_seed(3)
    for t in range(6):
        skipped = 1 if t < 3 else 2  # a middle parameter, then another one
        for i, (p, q) in enumerate(zip(model.parameters(), oracle_model.parameters())):
            if i == skipped:
                p.grad = q.grad = None
                continue
            grad = torch.randn(p.shape, generator=gen)
            p.grad = grad.clone()
            q.grad = grad
        opt.step()
        oracle.step()
    _assert_params(model, oracle_model, exact=backend == "reference", tol=6e-6)
    for p, q in zip(model.parameters(), oracle_model.parameters()):
        assert int(opt.state[p]["step"]) == int(oracle.opt.state[q]["step"])


# --- Masked weights and state stay exactly zero ---------------------------------------------


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_pruned_weights_and_state_exactly_zero(optimizer, backend):
    masked_cls, _, hp = OPTIMIZERS[optimizer]
    model, input_shape = _build("awkward")
    masks = _masks(model, keep=0.3)
    dense_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = masked_cls.from_model(model, masks, **hp)
    _assert_pruned_zero(model, masks)  # zeroed at construction
    steps = 150 if backend == "reference" else 40
    for t in range(steps):
        x, y = _batch(input_shape, t % 10)
        opt.zero_grad()
        (1e3 * _loss(model, x, y)).backward()  # large gradients: large updates
        opt.step()
        if t == steps // 2:
            # A rewind copies dense weights back in; the next step zeroes the pruned ones.
            model.load_state_dict(dense_before)
    _assert_pruned_zero(model, masks)
    for name, p in model.named_parameters():
        state = opt.state[p]
        for key, value in state.items():
            if key != "step" and name in masks:
                assert torch.equal(value[~masks[name]], torch.zeros(int((~masks[name]).sum())))
        # The kept weights did train.
        kept = masks.get(name, torch.ones_like(p, dtype=torch.bool))
        assert not torch.equal(p[kept], dense_before[name][kept])


def test_apply_masks_after_rewind():
    model, _ = _build("aligned")
    masks = _masks(model)
    dense = copy.deepcopy(model.state_dict())
    opt = MaskedSGD.from_model(model, masks, lr=0.1)
    model.load_state_dict(dense)
    opt.apply_masks()
    _assert_pruned_zero(model, masks)


# --- Flat buffers, gradient views, zero_grad --------------------------------------------------


def test_parameters_and_grads_are_views_of_flat_buffers():
    model, input_shape = _build("awkward")
    masks = _masks(model)
    opt = MaskedSGD.from_model(model, masks, lr=0.1, momentum=0.9)
    params = list(model.parameters())
    storage = params[0].untyped_storage().data_ptr()
    grad_storage = params[0].grad.untyped_storage().data_ptr()
    grad_views = [p.grad for p in params]
    assert all(p.untyped_storage().data_ptr() == storage for p in params)
    assert all(p.grad.untyped_storage().data_ptr() == grad_storage for p in params)
    x, y = _batch(input_shape, 0)
    _loss(model, x, y).backward()
    first = [p.grad.clone() for p in params]
    _loss(model, x, y).backward()  # accumulates in place, into the views
    assert all(p.grad is view for p, view in zip(params, grad_views))
    for p, g in zip(params, first):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-6, atol=1e-7)
    opt.zero_grad()
    assert all(p.grad is view and not p.grad.any() for p, view in zip(params, grad_views))
    # model.zero_grad() sets None; autograd then makes new tensors, copied in by step().
    model.zero_grad()
    _loss(model, x, y).backward()
    new_grads = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b, g, name in zip(params, before, new_grads, [n for n, _ in model.named_parameters()]):
        expected = b - 0.1 * g * masks.get(name, torch.ones_like(b, dtype=torch.bool))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    assert all(p.grad is view for p, view in zip(params, grad_views))


def test_state_layout_is_torch_optim():
    model, input_shape = _build("aligned")
    opt = MaskedAdam.from_model(model, _masks(model), lr=1e-3)
    x, y = _batch(input_shape, 0)
    for _ in range(3):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    for p in model.parameters():
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"].dtype == torch.float32 and float(state["step"]) == 3.0
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape


# --- state_dict -------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd_momentum_wd", "adamw"])
def test_state_dict_round_trip(optimizer, backend):
    masked_cls, _, hp = OPTIMIZERS[optimizer]
    model, input_shape = _build("awkward")
    masks = _masks(model)
    opt = masked_cls.from_model(model, masks, **hp)

    def train(m, o, steps):
        for t in steps:
            x, y = _batch(input_shape, t)
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()

    train(model, opt, range(5))
    saved = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    restored = masked_cls.from_model(clone, masks, **{**hp, "lr": 123.0})
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["lr"] == hp["lr"]
    # The restored state lives in the new optimizer's own flat buffers.
    saved_storages = {t.untyped_storage().data_ptr() for t in _flat_state(opt)}
    assert all(t.untyped_storage().data_ptr() not in saved_storages for t in _flat_state(restored))
    train(model, opt, range(5, 10))
    train(clone, restored, range(5, 10))
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(_flat_state(opt), _flat_state(restored)):
        assert torch.equal(a, b)


def test_state_dict_interoperates_with_torch_optim():
    # MaskedAdam (no masks) -> torch.optim.Adam continues identically; torch.optim.SGD ->
    # MaskedSGD with masks gets its momentum zeroed on pruned entries.
    model, input_shape = _build("awkward")
    opt = MaskedAdam(model.parameters(), lr=1e-2)
    x, y = _batch(input_shape, 0)
    for _ in range(3):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    twin = copy.deepcopy(model)
    torch_opt = torch.optim.Adam(twin.parameters(), lr=1.0, foreach=False)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, torch_opt)):
        o.zero_grad()
        _loss(m, x, y).backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    dense, _ = _build("aligned")
    sgd = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    dense(torch.randn(4, 32)).sum().backward()
    sgd.step()
    masks = _masks(dense)
    masked = MaskedSGD.from_model(copy.deepcopy(dense), masks, lr=0.1, momentum=0.9)
    masked.load_state_dict(copy.deepcopy(sgd.state_dict()))
    names = [name for name, _ in dense.named_parameters()]
    for name, p, q in zip(names, masked.param_groups[0]["params"], dense.parameters()):
        buffer = masked.state[p]["momentum_buffer"]
        keep = masks.get(name, torch.ones_like(q, dtype=torch.bool))
        assert torch.equal(buffer[keep], sgd.state[q]["momentum_buffer"][keep])
        assert not buffer[~keep].any()


def test_unsupported_torch_flags_are_rejected():
    model, _ = _build("aligned")
    opt = MaskedAdam(model.parameters(), lr=1e-3)
    state = opt.state_dict()
    state["param_groups"][0]["amsgrad"] = True
    opt.load_state_dict(state)
    with pytest.raises(ValueError, match="does not support amsgrad=True"):
        opt.step()


# --- Determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd_nesterov", "adamw"])
def test_deterministic(optimizer, backend):
    masked_cls, _, hp = OPTIMIZERS[optimizer]
    runs = []
    for _ in range(2):
        model, input_shape = _build("awkward")
        opt = masked_cls.from_model(model, _masks(model), **hp)
        for t in range(5):
            x, y = _batch(input_shape, t)
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()] + _flat_state(opt))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --- Bad input ------------------------------------------------------------------------------


def test_bad_optimizer_input():
    w = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"mask of parameter 0 has shape \(4, 3\)"):
        MaskedSGD([w], [torch.ones(4, 3, dtype=torch.bool)], lr=0.1)
    with pytest.raises(TypeError, match="must be a bool tensor"):
        MaskedAdam([w], [torch.ones(3, 4)])
    with pytest.raises(ValueError, match="got 2 masks for 1 parameters"):
        MaskedAdam([w], [None, None])
    with pytest.raises(TypeError, match="use from_model"):
        MaskedAdam([w], {"w": torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(TypeError, match="float32 parameters only.*torch.float64"):
        MaskedAdam([nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        MaskedSGD([w], lr=-0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        MaskedAdamW([w], lr=-1e-3)
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        MaskedSGD([w], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Invalid momentum"):
        MaskedSGD([w], lr=0.1, momentum=-0.9)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        MaskedAdam([w], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Invalid epsilon"):
        MaskedAdam([w], eps=-1.0)
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        MaskedAdam([w], weight_decay=-1.0)
    with pytest.raises(TypeError, match="single tensor"):
        MaskedSGD(w, lr=0.1)
    with pytest.raises(ValueError, match="appears twice"):
        MaskedSGD([w, w], lr=0.1)
    # Types: a string compared with a float failed inside the check; a one-value betas was
    # accepted and failed at the first step.
    with pytest.raises(TypeError, match="lr must be a number, got '0.1'"):
        MaskedSGD([w], lr="0.1")
    with pytest.raises(TypeError, match="momentum must be a number"):
        MaskedSGD([w], lr=0.1, momentum="0.9")
    with pytest.raises(ValueError, match=r"betas must be a pair \(beta1, beta2\), got \(0.9,\)"):
        MaskedAdam([w], betas=(0.9,))
    with pytest.raises(TypeError, match=r"betas\[1\] must be a number"):
        MaskedAdamW([w], betas=(0.9, None))


def test_bad_from_model_input():
    model, _ = _build("aligned")
    with pytest.raises(ValueError, match=r"masks for \['2.wieght'\] match no trainable"):
        MaskedSGD.from_model(model, {"2.wieght": torch.ones(16, 32, dtype=torch.bool)}, lr=0.1)
    with pytest.raises(ValueError, match=r"mask of 0.weight has shape \(32, 16\)"):
        MaskedSGD.from_model(model, {"0.weight": torch.ones(32, 16, dtype=torch.bool)}, lr=0.1)
    with pytest.raises(TypeError, match="mask of 2.weight must be a bool tensor"):
        MaskedSGD.from_model(model, {"2.weight": torch.ones(16, 32, dtype=torch.uint8)}, lr=0.1)


def test_moved_parameter_is_detected():
    model, _ = _build("aligned")
    opt = MaskedSGD.from_model(model, None, lr=0.1)
    model[0].weight.data = model[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="0.weight no longer lives in the optimizer's flat"):
        opt.step()


# --- Masked layers --------------------------------------------------------------------------

CONVS = {
    # (in, out, kernel, kwargs, input spatial size)
    "aligned": (4, 8, 3, dict(padding=1), 8),
    "awkward": (6, 9, (3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=2, groups=3), 11),
    "reflect": (3, 5, 3, dict(padding=1, padding_mode="reflect"), 7),
}


def _layer_mask(shape, seed=5):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5


@pytest.mark.parametrize("features", [(32, 16), (37, 13)])
def test_masked_linear_equals_dense_with_masked_weight(features):
    torch.manual_seed(0)
    dense = nn.Linear(*features)
    mask = _layer_mask(dense.weight.shape)
    masked = MaskedLinear.from_dense(copy.deepcopy(dense), mask)
    x = torch.randn(5, features[0], requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    out = masked(x)
    expected = F.linear(x_dense, dense.weight * mask, dense.bias)
    assert torch.equal(out, expected)  # the same ATen ops on the same operands
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert torch.equal(x.grad, x_dense.grad)
    assert torch.equal(masked.weight.grad, dense.weight.grad * mask)
    assert not masked.weight.grad[~mask].any()
    assert torch.equal(masked.bias.grad, dense.bias.grad)


@pytest.mark.parametrize("config", list(CONVS))
def test_masked_conv2d_equals_dense_with_masked_weight(config):
    c_in, c_out, kernel, kwargs, size = CONVS[config]
    torch.manual_seed(0)
    dense = nn.Conv2d(c_in, c_out, kernel, **kwargs)
    mask = _layer_mask(dense.weight.shape)
    masked = MaskedConv2d.from_dense(copy.deepcopy(dense), mask)
    x = torch.randn(2, c_in, size, size + 1)
    out = masked(x)
    weight = (dense.weight * mask).detach().requires_grad_(True)
    expected = dense._conv_forward(x, weight, dense.bias)
    assert torch.equal(out, expected)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert torch.equal(masked.weight.grad, weight.grad * mask)
    assert not masked.weight.grad[~mask].any()


def test_masked_layers_construct_share_and_save_masks():
    layer = MaskedLinear(5, 3)
    assert layer.mask.dtype == torch.bool and layer.mask.all()
    assert "mask" in layer.state_dict()
    conv = MaskedConv2d(2, 4, 3, bias=False, mask=torch.zeros(4, 2, 3, 3, dtype=torch.bool))
    assert conv.bias is None and not conv(torch.randn(1, 2, 5, 5)).any()
    dense = nn.Conv2d(2, 4, 3)
    shared = MaskedConv2d.from_dense(dense)
    assert shared.weight is dense.weight and shared.bias is dense.bias
    # The layer keeps its own copy of the mask.
    mask = torch.ones(3, 5, dtype=torch.bool)
    layer.set_mask(mask)
    mask[0, 0] = False
    assert layer.mask.all()


def test_bad_layer_masks():
    with pytest.raises(ValueError, match=r"mask has shape \(5, 3\) but the weight has shape"):
        MaskedLinear(5, 3, mask=torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be a bool tensor"):
        MaskedConv2d.from_dense(nn.Conv2d(1, 1, 3), torch.ones(1, 1, 3, 3))
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        MaskedLinear.from_dense(nn.Conv2d(1, 1, 3))


def test_mask_model_swaps_layers_and_keeps_names():
    model, input_shape = _build("awkward")
    reference = copy.deepcopy(model)
    masks = _masks(model)
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    assert mask_model(model, masks) is model
    assert isinstance(model[0], MaskedConv2d) and isinstance(model[3], MaskedLinear)
    assert [name for name, _ in model.named_parameters()] == names
    assert all(a is b for a, b in zip(model.parameters(), params))
    x, _ = _batch(input_shape, 0)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    torch.testing.assert_close(model(x), reference(x), rtol=1e-6, atol=1e-6)
    # Masking again replaces the masks in place.
    new_masks = _masks(model, seed=9)
    mask_model(model, new_masks)
    assert torch.equal(model[3].mask, new_masks["3.weight"])
    # Nested modules and a root layer.
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2))
    mask_model(nested, {"0.0.weight": torch.ones(4, 4, dtype=torch.bool)})
    assert isinstance(nested[0][0], MaskedLinear) and type(nested[1]) is nn.Linear
    root = mask_model(nn.Linear(3, 2), {"weight": torch.ones(2, 3, dtype=torch.bool)})
    assert isinstance(root, MaskedLinear)


def test_mask_model_bad_input():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="only nn.Linear and nn.Conv2d"):
        mask_model(model, {"1.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="is not a weight name"):
        mask_model(model, {"0.bias": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="names no module"):
        mask_model(model, {"7.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="mask has shape"):
        mask_model(model, {"0.weight": torch.ones(4, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="masks must be a dict .* got list"):
        mask_model(model, [torch.ones(3, 4, dtype=torch.bool)])


def test_masked_model_trains_with_masked_optimizer(backend):
    # The two halves together: gradients of pruned weights are 0 already in the layer, and
    # the optimizer keeps the weights 0; the loss goes down.
    model, input_shape = _build("awkward")
    masks = _masks(model, keep=0.3)
    mask_model(model, masks)
    opt = MaskedAdam.from_model(model, masks, lr=1e-2)
    x, y = _batch(input_shape, 0, n=32)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        for name, p in model.named_parameters():
            if name in masks:
                assert not p.grad[~masks[name]].any()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    _assert_pruned_zero(model, masks)
