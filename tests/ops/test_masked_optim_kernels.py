"""Fused masked optimizer step: Triton launchers against the twin, the twin against torch.optim.

On CPU the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set by conftest).

Tolerances. Kernel and twin evaluate the same fp32 formulas in the same order; they differ
only where ATen's vectorised CPU loops contract ``a + alpha * b`` into one FMA (add with
alpha, lerp, addcmul) and the kernel rounds twice, or the reverse on GPU. That is at most one
rounding (1 ulp) per operation, a handful per element per step: one step agrees to
``rtol=1e-6, atol=1e-6`` (8 ulp of fp32 eps = 1.2e-7 relative; the atol covers results that
cancel to near 0, e.g. ``p - lr d`` with ``p`` close to ``lr d``). Over ``T`` steps the
rounding differences add (state updates contract with factor ``beta < 1``, the parameter
integrates the updates): ``rtol=atol=T * 1e-6`` is that bound with the same per-step slack.
"""

from __future__ import annotations

import pytest
import torch

from imc_kernels import _dispatch, ops
from imc_kernels.reference import masked_optim as ref

pytest.importorskip("triton")
from imc_kernels.ops import masked_optim as triton_optim  # noqa: E402

# 2048: two whole blocks of 1024; 1000: one partial block; 4099: four blocks and three
# elements (awkward: a multiple of no power of two).
SIZES = [2048, 1000, 4099]
ONE_STEP = dict(rtol=1e-6, atol=1e-6)
SGD_CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening_wd": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2),
    "nesterov_wd": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=5e-3),
    "wd_only": dict(lr=0.1, weight_decay=0.1),
}
ADAM_CONFIGS = {
    "adam": dict(lr=1e-2),
    "adam_l2": dict(lr=1e-2, weight_decay=0.1),
    "adamw": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    # beta1 < 0.5: ATen's lerp takes its other branch (from the end point).
    "small_betas": dict(lr=1e-1, betas=(0.3, 0.6), eps=1e-6),
}


def _randn(n, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, generator=gen)


def _mask(n, seed, dtype=torch.bool, keep=0.4):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=gen) < keep
    return mask if dtype == torch.bool else mask.to(dtype)


def _poisoned(n):
    return torch.full((n,), float("nan"))


def _sgd_state(n, cfg):
    return _randn(n, 3) if cfg.get("momentum", 0.0) else None


def _assert_pruned_zero(mask, *tensors):
    if mask is None:
        return
    pruned = mask == 0
    for tensor in tensors:
        if tensor is not None:
            assert torch.equal(tensor[pruned], torch.zeros(int(pruned.sum())))


# --- One step: launcher against the twin, every output element written -----------------------


@pytest.mark.parametrize("mask_dtype", [None, torch.bool, torch.uint8])
@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
@pytest.mark.parametrize("n", SIZES)
def test_sgd_matches_reference(n, config, first_step, mask_dtype):
    cfg = SGD_CONFIGS[config]
    param, grad = _randn(n, 1), _randn(n, 2)
    buffer = _sgd_state(n, cfg)
    mask = None if mask_dtype is None else _mask(n, 4, mask_dtype)
    out_param = _poisoned(n)
    out_buffer = _poisoned(n) if buffer is not None else None
    new_param, new_buffer = triton_optim.masked_sgd_step(
        param,
        grad,
        mask,
        buffer,
        first_step=first_step,
        out_param=out_param,
        out_momentum_buffer=out_buffer,
        **cfg,
    )
    ref_param, ref_buffer = ref.masked_sgd_step(
        param.clone(),
        grad,
        mask,
        None if buffer is None else buffer.clone(),
        first_step=first_step,
        **cfg,
    )
    assert new_param is out_param and new_buffer is out_buffer
    torch.testing.assert_close(new_param, ref_param, **ONE_STEP)
    if buffer is not None:
        torch.testing.assert_close(new_buffer, ref_buffer, **ONE_STEP)
    _assert_pruned_zero(mask, new_param, new_buffer)


@pytest.mark.parametrize("mask_dtype", [None, torch.bool, torch.uint8])
@pytest.mark.parametrize("step", [1, 7, 1000])
@pytest.mark.parametrize("config", list(ADAM_CONFIGS))
@pytest.mark.parametrize("n", SIZES)
def test_adam_matches_reference(n, config, step, mask_dtype):
    cfg = ADAM_CONFIGS[config]
    param, grad = _randn(n, 1), _randn(n, 2)
    exp_avg = _randn(n, 3, 0.1)
    exp_avg_sq = _randn(n, 5).square()
    mask = None if mask_dtype is None else _mask(n, 4, mask_dtype)
    outs = dict(out_param=_poisoned(n), out_exp_avg=_poisoned(n), out_exp_avg_sq=_poisoned(n))
    result = triton_optim.masked_adam_step(
        param, grad, mask, exp_avg, exp_avg_sq, step=step, **outs, **cfg
    )
    expected = ref.masked_adam_step(
        param.clone(), grad, mask, exp_avg.clone(), exp_avg_sq.clone(), step=step, **cfg
    )
    assert all(a is b for a, b in zip(result, outs.values()))
    for actual, reference in zip(result, expected):
        torch.testing.assert_close(actual, reference, **ONE_STEP)
    _assert_pruned_zero(mask, *result)


# --- Many steps, in place -----------------------------------------------------------------


@pytest.mark.parametrize("n", [1024, 1000])
def test_trajectories_match_reference_in_place(n):
    # 25 steps of each optimizer in place (out=None) with fresh gradients, kernel against twin;
    # pruned weights start nonzero and must be zero from the first step on.
    steps = 25
    tol = dict(rtol=steps * 1e-6, atol=steps * 1e-6)
    mask = _mask(n, 4)
    pruned = ~mask
    sgd = SGD_CONFIGS["nesterov_wd"]
    kernel_p, ref_p = _randn(n, 1), _randn(n, 1)
    kernel_buf, ref_buf = torch.empty(n), torch.empty(n)
    for t in range(steps):
        grad = _randn(n, 100 + t)
        triton_optim.masked_sgd_step(kernel_p, grad, mask, kernel_buf, first_step=t == 0, **sgd)
        ref.masked_sgd_step(ref_p, grad, mask, ref_buf, first_step=t == 0, **sgd)
        assert not kernel_p[pruned].any() and not kernel_buf[pruned].any()
    torch.testing.assert_close(kernel_p, ref_p, **tol)
    torch.testing.assert_close(kernel_buf, ref_buf, **tol)
    for config in ("adam_l2", "adamw"):
        cfg = ADAM_CONFIGS[config]
        kernel = [_randn(n, 1), torch.zeros(n), torch.zeros(n)]
        reference = [t.clone() for t in kernel]
        for t in range(steps):
            grad = _randn(n, 200 + t)
            triton_optim.masked_adam_step(kernel[0], grad, mask, *kernel[1:], step=t + 1, **cfg)
            ref.masked_adam_step(reference[0], grad, mask, *reference[1:], step=t + 1, **cfg)
            assert not any(buffer[pruned].any() for buffer in kernel)
        for actual, expected in zip(kernel, reference):
            torch.testing.assert_close(actual, expected, **tol)


def test_slices_of_a_flat_buffer():
    # The optimizers launch on slices [start:end] of one flat buffer: offset pointers, and the
    # elements outside the slice must not be touched.
    n = 3000
    param, grad, mask = _randn(n, 1), _randn(n, 2), _mask(n, 4)
    exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    before = param.clone()
    span = slice(1001, 2500)
    triton_optim.masked_adam_step(
        param[span], grad[span], mask[span], exp_avg[span], exp_avg_sq[span], step=1, lr=0.1
    )
    expected = ref.masked_adam_step(
        before[span].clone(),
        grad[span],
        mask[span],
        torch.zeros(1499),
        torch.zeros(1499),
        step=1,
        lr=0.1,
    )
    torch.testing.assert_close(param[span], expected[0], **ONE_STEP)
    assert torch.equal(param[:1001], before[:1001]) and torch.equal(param[2500:], before[2500:])
    assert not exp_avg[:1001].any() and not exp_avg[2500:].any()


def test_pruned_nan_and_inf_gradients_do_not_leak():
    # 0 * inf = NaN: the mask must select, not multiply, or a diverging pruned gradient
    # would poison the state and (through the final mask product) the pruned weights.
    n = 1000
    mask = _mask(n, 4)
    grad = _randn(n, 2)
    grad[~mask] = torch.tensor([float("inf"), float("nan"), -float("inf")]).repeat(n)[
        : int((~mask).sum())
    ]
    for launcher in (triton_optim, ref):
        param, buffer = _randn(n, 1), torch.zeros(n)
        launcher.masked_sgd_step(param, grad, mask, buffer, lr=0.1, momentum=0.9, first_step=True)
        assert torch.isfinite(param).all() and torch.isfinite(buffer).all()
        _assert_pruned_zero(mask, param, buffer)
        state = [_randn(n, 1), torch.zeros(n), torch.zeros(n)]
        launcher.masked_adam_step(state[0], grad, mask, *state[1:], step=1, lr=0.1)
        assert all(torch.isfinite(t).all() for t in state)
        _assert_pruned_zero(mask, *state)


def test_deterministic():
    n = 4099
    param, grad, mask = _randn(n, 1), _randn(n, 2), _mask(n, 4)
    runs = []
    for _ in range(2):
        state = [param.clone(), _randn(n, 3, 0.1), _randn(n, 5).square()]
        triton_optim.masked_adam_step(
            state[0], grad, mask, *state[1:], step=3, lr=1e-2, weight_decay=0.1
        )
        buffer = _randn(n, 6)
        sgd_param = param.clone()
        triton_optim.masked_sgd_step(sgd_param, grad, mask, buffer, lr=0.1, momentum=0.9)
        runs.append(state + [sgd_param, buffer])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_empty_buffers():
    empty = torch.empty(0)
    p, b = triton_optim.masked_sgd_step(empty, empty, None, empty, lr=0.1, momentum=0.9)
    assert p.numel() == 0 and b.numel() == 0
    result = triton_optim.masked_adam_step(empty, empty, None, empty, empty, step=1, lr=0.1)
    assert all(t.numel() == 0 for t in result)


# --- The twin against torch.optim (bit for bit on CPU: same ATen ops in the same order) -------


@pytest.mark.parametrize("config", ["momentum", "dampening_wd", "nesterov_wd"])
def test_reference_sgd_is_torch_sgd(config):
    cfg = SGD_CONFIGS[config]
    n = 1000
    mask = _mask(n, 4)
    param = torch.nn.Parameter(_randn(n, 1) * mask)
    ours = param.detach().clone()
    buffer = torch.empty(n)
    opt = torch.optim.SGD([param], foreach=False, **cfg)
    for t in range(5):
        grad = _randn(n, 10 + t)
        param.grad = grad * mask
        opt.step()
        with torch.no_grad():
            param.mul_(mask)
        ref.masked_sgd_step(ours, grad, mask, buffer, first_step=t == 0, **cfg)
    assert torch.equal(ours, param.detach())
    assert torch.equal(buffer, opt.state[param]["momentum_buffer"])


@pytest.mark.parametrize("config", ["adam", "adam_l2", "adamw", "small_betas"])
def test_reference_adam_is_torch_adam(config):
    cfg = dict(ADAM_CONFIGS[config])
    decoupled = cfg.pop("decoupled_weight_decay", False)
    n = 1000
    mask = _mask(n, 4)
    param = torch.nn.Parameter(_randn(n, 1) * mask)
    ours = [param.detach().clone(), torch.zeros(n), torch.zeros(n)]
    optimizer = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = optimizer([param], foreach=False, **{"weight_decay": 0.0, **cfg})
    for t in range(5):
        grad = _randn(n, 10 + t)
        param.grad = grad * mask
        opt.step()
        with torch.no_grad():
            param.mul_(mask)
        ref.masked_adam_step(
            ours[0], grad, mask, *ours[1:], step=t + 1, decoupled_weight_decay=decoupled, **cfg
        )
    state = opt.state[param]
    assert torch.equal(ours[0], param.detach())
    assert torch.equal(ours[1], state["exp_avg"]) and torch.equal(ours[2], state["exp_avg_sq"])


# --- Through the dispatcher -----------------------------------------------------------------


def test_dispatcher_backends_agree(monkeypatch):
    n = 1000
    grad, mask = _randn(n, 2), _mask(n, 4)
    calls = []
    for name in ("masked_sgd_step", "masked_adam_step"):
        launcher = getattr(triton_optim, name)

        def spy(*args, _launcher=launcher, **kwargs):
            calls.append(_launcher.__name__)
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(triton_optim, name, spy)
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv(_dispatch.ENV_BACKEND, backend)
        sgd = ops.masked_sgd_step(
            _randn(n, 1), grad, mask, _randn(n, 3), lr=0.1, momentum=0.9, weight_decay=0.01
        )
        adam = ops.masked_adam_step(
            _randn(n, 1), grad, mask, torch.zeros(n), torch.zeros(n), step=1, lr=1e-2
        )
        results[backend] = sgd + adam
    assert calls == ["masked_sgd_step", "masked_adam_step"]
    for actual, expected in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(actual, expected, **ONE_STEP)


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(4)
    with pytest.raises(_dispatch.BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.masked_sgd_step(x, x, None, None, lr=0.1)


# --- Bad input ------------------------------------------------------------------------------

BAD_SGD = [
    (dict(param=torch.zeros(4, dtype=torch.float64)), TypeError, "param must be float32"),
    (dict(grad=torch.zeros(4, dtype=torch.float16)), TypeError, "grad must be float32"),
    (dict(grad=torch.zeros(5)), ValueError, "grad has 5 elements but param has 4"),
    (dict(param=torch.zeros(4, 2).t()), ValueError, "param must be contiguous"),
    (dict(mask=torch.ones(4)), TypeError, "mask must be bool or uint8"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask has 3 elements"),
    (dict(mask=torch.ones(4, dtype=torch.bool, device="meta")), ValueError, "mask is on meta"),
    (dict(lr=-0.1), ValueError, "Invalid learning rate"),
    (dict(lr=float("nan")), ValueError, "Invalid learning rate"),
    (dict(momentum=-0.5), ValueError, "Invalid momentum"),
    (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay"),
    (dict(momentum=0.9, momentum_buffer=None), ValueError, "needs a momentum_buffer"),
    (dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum"),
    (dict(out_param=torch.zeros(4, dtype=torch.float64)), TypeError, "out_param must be float32"),
]


@pytest.mark.parametrize("backend", [triton_optim, ref, ops], ids=["triton", "reference", "ops"])
@pytest.mark.parametrize("override,error,message", BAD_SGD)
def test_bad_input_sgd(backend, override, error, message):
    args = dict(
        param=torch.zeros(4),
        grad=torch.zeros(4),
        mask=None,
        momentum_buffer=torch.zeros(4),
        lr=0.1,
        momentum=0.0,
        nesterov=False,
    )
    args.update(override)
    with pytest.raises(error, match=message):
        backend.masked_sgd_step(
            args.pop("param"),
            args.pop("grad"),
            args.pop("mask"),
            args.pop("momentum_buffer"),
            **args,
        )


BAD_ADAM = [
    (dict(exp_avg=torch.zeros(4, dtype=torch.float64)), TypeError, "exp_avg must be float32"),
    (dict(exp_avg_sq=torch.zeros(3)), ValueError, "exp_avg_sq has 3 elements"),
    (dict(step=0), ValueError, "step must be an int >= 1"),
    (dict(step=2.0), ValueError, "step must be an int >= 1"),
    (dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1"),
    (dict(eps=-1e-8), ValueError, "Invalid epsilon"),
    (dict(lr=-1e-3), ValueError, "Invalid learning rate"),
    (dict(mask=torch.ones(4, dtype=torch.int64)), TypeError, "mask must be bool or uint8"),
]


@pytest.mark.parametrize("backend", [triton_optim, ref, ops], ids=["triton", "reference", "ops"])
@pytest.mark.parametrize("override,error,message", BAD_ADAM)
def test_bad_input_adam(backend, override, error, message):
    args = dict(
        param=torch.zeros(4),
        grad=torch.zeros(4),
        mask=None,
        exp_avg=torch.zeros(4),
        exp_avg_sq=torch.zeros(4),
        step=1,
        lr=1e-3,
    )
    args.update(override)
    with pytest.raises(error, match=message):
        backend.masked_adam_step(
            args.pop("param"),
            args.pop("grad"),
            args.pop("mask"),
            args.pop("exp_avg"),
            args.pop("exp_avg_sq"),
            **args,
        )


def test_non_tensor_param_through_ops():
    with pytest.raises(TypeError, match="param must be a tensor"):
        ops.masked_sgd_step([0.0], torch.zeros(1), None, None, lr=0.1)
