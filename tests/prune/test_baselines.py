"""Baselines against independent references: SNIP against the mask derivative, GraSP's H g
against a dense torch.func Hessian, SynFlow against its closed form on a linear net, IMP's
schedule and rewinding."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian
from torch.utils.data import TensorDataset

from imc_prune import baselines
from imc_prune.data import DatasetSplits
from imc_prune.masks import is_two_four, masks_from_scores, prunable_parameters, sparsity_report
from imc_prune.train import train

# (input, hidden, classes): aligned and awkward.
SIZES = {"aligned": (8, 16, 4), "awkward": (5, 7, 3)}


def _mlp(sizes, seed=0, dtype=torch.float32, bias=True):
    torch.manual_seed(seed)
    d_in, hidden, classes = sizes
    return nn.Sequential(
        nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, classes, bias=bias)
    ).to(dtype)


def _batch(sizes, n=12, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, sizes[0], generator=g, dtype=dtype), torch.randint(
        0, sizes[2], (n,), generator=g
    )


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


def _total_kept(masks):
    return sum(int(m.sum()) for m in masks.values())


def _toy_data(n_train=96, n_test=48, d_in=6, classes=3, seed=0):
    # Linearly separable: the label is the argmax of a fixed linear map.
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, classes, generator=g)
    x = torch.randn(n_train + n_test, d_in, generator=g)
    y = (x @ w).argmax(dim=1)
    return DatasetSplits(
        name="toy",
        train=TensorDataset(x[:n_train], y[:n_train]),
        test=TensorDataset(x[n_train:], y[n_train:]),
        num_classes=classes,
        input_shape=(d_in,),
    )


# --------------------------------------------------------------------------------------------
# random and magnitude


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_random_exact_counts_and_seeded(sizes, scope):
    model = _mlp(sizes)
    before = _state(model)
    masks = baselines.random(model, 0.7, scope=scope, seed=3)
    params = prunable_parameters(model)
    if scope == "global":
        n = sum(p.numel() for p in params.values())
        assert _total_kept(masks) == round((1 - 0.7) * n)
    else:
        for name, p in params.items():
            assert int(masks[name].sum()) == round((1 - 0.7) * p.numel())
    again = baselines.random(model, 0.7, scope=scope, seed=3)
    other = baselines.random(model, 0.7, scope=scope, seed=4)
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    assert any(not torch.equal(masks[k], other[k]) for k in masks)
    _assert_untouched(model, before)


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_magnitude_keeps_largest_weights(sizes):
    model = _mlp(sizes)
    masks = baselines.magnitude(model, 0.6)
    params = prunable_parameters(model)
    kept = torch.cat([p.detach().abs()[masks[k]] for k, p in params.items()])
    dropped = torch.cat([p.detach().abs()[~masks[k]] for k, p in params.items()])
    assert kept.min() >= dropped.max()
    n = sum(p.numel() for p in params.values())
    assert kept.numel() == round((1 - 0.6) * n)


# --------------------------------------------------------------------------------------------
# SNIP


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_snip_single_layer_closed_form(sizes):
    # Softmax cross-entropy of one Linear layer: dL/dW = (softmax(z) - onehot)^T x / n.
    d_in, _, classes = sizes
    torch.manual_seed(0)
    model = nn.Linear(d_in, classes).double()
    x, y = _batch(sizes, dtype=torch.float64)
    p = torch.softmax(model(x).detach(), dim=1)
    grad_w = (p - F.one_hot(y, classes).double()).T @ x / x.shape[0]
    expected = (grad_w * model.weight.detach()).abs()
    scores = baselines.snip_scores(model, (x, y))
    torch.testing.assert_close(scores["weight"], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_snip_is_the_mask_derivative(sizes):
    # SNIP's definition: |dL(c ⊙ w)/dc| at c = 1, taken here through torch.func.
    model = _mlp(sizes, dtype=torch.float64)
    batch = _batch(sizes, dtype=torch.float64)
    before = _state(model)
    params = dict(model.named_parameters())
    names = list(prunable_parameters(model))

    def loss_of(gates):
        gated = {k: (v * gates[k] if k in gates else v) for k, v in params.items()}
        return F.cross_entropy(functional_call(model, gated, (batch[0],)), batch[1])

    expected = grad(loss_of)({k: torch.ones_like(params[k]) for k in names})
    scores = baselines.snip_scores(model, batch)
    for name in names:
        torch.testing.assert_close(scores[name], expected[name].abs(), rtol=1e-12, atol=1e-14)
    masks = baselines.snip(model, batch, 0.5)
    assert masks.keys() == scores.keys()
    ref = masks_from_scores({k: expected[k].abs() for k in names}, 0.5)
    assert all(torch.equal(masks[k], ref[k]) for k in names)
    _assert_untouched(model, before)


def test_snip_uses_eval_mode_and_restores_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    batch = _batch((5, 8, 3))
    first = baselines.snip_scores(model, batch)
    second = baselines.snip_scores(model, batch)  # dropout off: deterministic
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert model.training and model[1].training


# --------------------------------------------------------------------------------------------
# GraSP


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_hessian_gradient_product_against_dense_hessian(sizes, temperature):
    model = _mlp(sizes, dtype=torch.float64)
    x, y = _batch(sizes, dtype=torch.float64)
    before = _state(model)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    weights = set(prunable_parameters(model))

    def unflatten(flat):
        out, offset = {}, 0
        for name, shape in zip(names, shapes):
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out

    def loss(flat):
        logits = functional_call(model, unflatten(flat), (x,))
        return F.cross_entropy(logits / temperature, y)

    dense_h = hessian(loss)(flat0)  # (d, d), fp64
    g = unflatten(torch.func.grad(loss)(flat0))
    # GraSP takes g over the weights only: zero on the biases.
    g_w = torch.cat(
        [g[n].reshape(-1) if n in weights else torch.zeros(g[n].numel()) for n in names]
    )
    hg = unflatten(dense_h @ g_w.double())
    params = dict(model.named_parameters())
    scores = baselines.grasp_scores(model, (x, y), temperature=temperature)
    assert set(scores) == weights
    for name in weights:
        expected = -params[name].detach() * hg[name]
        # fp64 throughout; the only difference is the order of summation.
        torch.testing.assert_close(scores[name], expected, rtol=1e-9, atol=1e-15)
    _assert_untouched(model, before)


def test_grasp_removes_the_highest_scores():
    sizes = SIZES["awkward"]
    model = _mlp(sizes, dtype=torch.float64)
    batch = _batch(sizes, dtype=torch.float64)
    scores = baselines.grasp_scores(model, batch)
    masks = baselines.grasp(model, batch, 0.6)
    kept = torch.cat([scores[k][m] for k, m in masks.items()])
    removed = torch.cat([scores[k][~m] for k, m in masks.items()])
    assert kept.max() <= removed.min()
    assert kept.numel() == round((1 - 0.6) * (kept.numel() + removed.numel()))


def test_grasp_double_backward_engine_agrees():
    sizes = SIZES["aligned"]
    model = _mlp(sizes, dtype=torch.float64)
    batch = _batch(sizes, dtype=torch.float64)
    a = baselines.grasp_scores(model, batch, engine="func")
    b = baselines.grasp_scores(model, batch, engine="double_backward")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-15)


def test_grasp_bad_temperature():
    sizes = SIZES["aligned"]
    with pytest.raises(ValueError, match="temperature"):
        baselines.grasp(_mlp(sizes), _batch(sizes), 0.5, temperature=0.0)


# --------------------------------------------------------------------------------------------
# SynFlow


def _synflow_closed_form(w1, w2, b1, m1, m2):
    """Scores of R = 1ᵀ(|W2 ⊙ M2| (|W1 ⊙ M1| 1 + |b1|) + |b2|) for the masked weights."""
    a1, a2 = (w1 * m1).abs(), (w2 * m2).abs()
    hidden = a1.sum(dim=1) + (b1.abs() if b1 is not None else 0.0)  # (h,) on the ones input
    s1 = a1 * a2.sum(dim=0)[:, None]  # |W1|_ij * (1ᵀ|W2|)_i
    s2 = a2 * hidden[None, :]  # |W2|_ki * (|W1| 1 + |b1|)_i
    return s1, s2


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("bias", [False, True])
def test_synflow_scores_closed_form(sizes, bias):
    d_in, hidden, classes = sizes
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Linear(hidden, classes, bias=bias))
    before = _state(model)
    w1, w2 = model[0].weight.detach().double(), model[1].weight.detach().double()
    b1 = model[0].bias.detach().double() if bias else None
    ones = torch.ones_like(w1, dtype=torch.bool), torch.ones_like(w2, dtype=torch.bool)
    s1, s2 = _synflow_closed_form(w1, w2, b1, *ones)
    scores = baselines.synflow_scores(model, (d_in,))
    torch.testing.assert_close(scores["0.weight"], s1, rtol=1e-12, atol=0)
    torch.testing.assert_close(scores["1.weight"], s2, rtol=1e-12, atol=0)
    # With masks: pruned weights score zero and the flow through them is gone.
    m1 = torch.rand(w1.shape) > 0.3
    m2 = torch.rand(w2.shape) > 0.3
    masked = baselines.synflow_scores(model, (d_in,), masks={"0.weight": m1, "1.weight": m2})
    s1, s2 = _synflow_closed_form(w1, w2, b1, m1, m2)
    torch.testing.assert_close(masked["0.weight"], s1, rtol=1e-12, atol=0)
    torch.testing.assert_close(masked["1.weight"], s2, rtol=1e-12, atol=0)
    _assert_untouched(model, before)


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("iterations", [1, 4])
def test_synflow_iterations_follow_the_exponential_schedule(sizes, iterations):
    d_in, hidden, classes = sizes
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Linear(hidden, classes))
    sparsity = 0.8
    masks = baselines.synflow(model, sparsity, input_shape=(d_in,), iterations=iterations)

    # Reference: the loop written out with the closed-form scores.
    w1, w2 = model[0].weight.detach().double(), model[1].weight.detach().double()
    b1 = model[0].bias.detach().double()
    m1, m2 = torch.ones_like(w1, dtype=torch.bool), torch.ones_like(w2, dtype=torch.bool)
    for k in range(1, iterations + 1):
        s1, s2 = _synflow_closed_form(w1, w2, b1, m1, m2)
        scores = {"0.weight": s1.masked_fill(~m1, -1), "1.weight": s2.masked_fill(~m2, -1)}
        step = 1 - (1 - sparsity) ** (k / iterations) if k < iterations else sparsity
        ref = masks_from_scores(scores, step)
        assert (ref["0.weight"] <= m1).all() and (ref["1.weight"] <= m2).all()  # nested
        m1, m2 = ref["0.weight"], ref["1.weight"]
    assert torch.equal(masks["0.weight"], m1) and torch.equal(masks["1.weight"], m2)
    n = w1.numel() + w2.numel()
    assert _total_kept(masks) == round((1 - 0.8) * n)


def test_synflow_leaves_model_and_batchnorm_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
    )
    model(torch.randn(4, 2, 7, 7))  # move the running statistics off their defaults
    with torch.no_grad():
        model[1].running_mean.copy_(-model[1].running_mean.abs() - 0.1)
    before = _state(model)
    masks = baselines.synflow(model, 0.5, input_shape=(2, 7, 7), iterations=3)
    assert _total_kept(masks) == round((1 - 0.5) * (54 + 300))
    _assert_untouched(model, before)
    assert model.training


def test_synflow_errors():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="input_shape"):
        baselines.synflow(model, 0.5, input_shape=(0,))
    with pytest.raises(ValueError, match="iterations"):
        baselines.synflow(model, 0.5, input_shape=(3,), iterations=0)
    with pytest.raises(ValueError, match="sparsity"):
        baselines.synflow(model, 1.0, input_shape=(3,))


# --------------------------------------------------------------------------------------------
# One-shot magnitude and IMP


def test_imp_schedule():
    assert baselines.imp_schedule(1000, 0.5) == [800, 640, 512, 500]
    assert baselines.imp_schedule(1000, 0.488) == [800, 640, 512]
    assert baselines.imp_schedule(1000, 0.0) == []
    counts = baselines.imp_schedule(266_200, 0.98)  # LeNet-300-100 to 2 percent
    assert counts[-1] == round((1 - 0.98) * 266_200)
    assert len(counts) == math.ceil(math.log(0.02) / math.log(0.8))
    with pytest.raises(ValueError, match="rate"):
        baselines.imp_schedule(10, 0.5, rate=1.0)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_imp_rounds_final_sparsity_and_rewind_to_w0(scope):
    data = _toy_data()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))  # 96 + 48 weights
    torch.manual_seed(0)
    model.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
    w0 = _state(model)
    starts, round_masks = [], []

    def on_step(step, net):
        if step == 0:
            starts.append(_state(net))

    masks, info = baselines.imp(
        model,
        data,
        0.5,
        scope=scope,
        train_kwargs={"steps": 5, "batch_size": 16, "lr": 1e-2, "callback": on_step},
        callback=lambda r, m, result: round_masks.append(m),
    )
    n = 144
    assert info.rounds == len(baselines.imp_schedule(n, 0.5)) == len(round_masks) == 4
    assert info.sgd_steps == 4 * 5 and len(info.accuracies) == 4
    assert info.trained_sparsities[0] == 0.0
    if scope == "global":
        assert _total_kept(masks) == 72
        assert info.round_sparsities[-1] == 0.5
    else:
        assert int(masks["0.weight"].sum()) == 48 and int(masks["2.weight"].sum()) == 24
    # Masks are nested round to round, and each round starts from W0 on the survivors.
    for earlier, later in zip(round_masks, round_masks[1:]):
        assert all((later[k] <= earlier[k]).all() for k in later)
    assert len(starts) == 4
    for start, previous in zip(starts[1:], round_masks):
        for name, value in start.items():
            if name in previous:
                assert torch.equal(value[previous[name]], w0[name][previous[name]])
                assert (value[~previous[name]] == 0).all()
            else:
                assert torch.equal(value, w0[name])
    assert all(torch.equal(info.rewind_state[k], w0[k]) for k in w0)
    _assert_untouched(model, w0)


def test_imp_late_rewinding_snapshot():
    data = _toy_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    kwargs = {"steps": 6, "batch_size": 16, "lr": 1e-2, "seed": 2}
    _, info = baselines.imp(model, data, 0.36, rewind_step=3, train_kwargs=kwargs)
    assert info.rounds == 2 and info.rewind_step == 3
    reference = copy.deepcopy(model)
    train(reference, None, data, **{**kwargs, "steps": 3})  # same seed: same first 3 steps
    for name, value in reference.state_dict().items():
        assert torch.equal(info.rewind_state[name], value)
    with pytest.raises(ValueError, match="past the end"):
        baselines.imp(model, data, 0.5, rewind_step=7, train_kwargs=kwargs)


def test_one_shot_magnitude_prunes_the_trained_weights():
    data = _toy_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    w0 = _state(model)
    kwargs = {"epochs": 2, "batch_size": 32, "lr": 1e-2}
    masks, info = baselines.one_shot_magnitude(model, data, 0.75, train_kwargs=kwargs)
    trained = copy.deepcopy(model)
    result = train(trained, None, data, **kwargs)
    expected = baselines.magnitude(trained, 0.75)
    assert all(torch.equal(masks[k], expected[k]) for k in masks)
    assert info.rounds == 1 and info.sgd_steps == result.sgd_steps == 6
    assert info.trained_acc == result.final_acc
    assert all(torch.equal(info.rewind_state[k], w0[k]) for k in w0)
    assert sparsity_report(model, masks)["sparsity"] == 0.75
    _assert_untouched(model, w0)
    _, kept = baselines.one_shot_magnitude(model, data, 0.75, rewind="trained", train_kwargs=kwargs)
    assert all(torch.equal(kept.rewind_state[k], v) for k, v in trained.state_dict().items())


def test_training_baselines_errors():
    data = _toy_data()
    model = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="sparsity"):
        baselines.imp(model, data, 1.0, train_kwargs={"steps": 1})
    with pytest.raises(ValueError, match="rewind"):
        baselines.one_shot_magnitude(model, data, 0.5, rewind="late", train_kwargs={"steps": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        baselines.imp(model, data, 0.5, train_kwargs={"preset": "lth_mlp"})
    with pytest.raises(ValueError, match="must not contain 'masks'"):
        baselines.imp(model, data, 0.5, train_kwargs={"steps": 1, "masks": {}})


def test_all_baselines_share_the_mask_type():
    sizes = SIZES["awkward"]
    model = _mlp(sizes)
    batch = _batch(sizes)
    for masks in (
        baselines.random(model, 0.5),
        baselines.magnitude(model, 0.5),
        baselines.snip(model, batch, 0.5),
        baselines.grasp(model, batch, 0.5),
        baselines.synflow(model, 0.5, input_shape=(sizes[0],), iterations=2),
    ):
        assert list(masks) == list(prunable_parameters(model))
        assert all(m.dtype == torch.bool for m in masks.values())
        np.testing.assert_equal(_total_kept(masks), round((1 - 0.5) * (35 + 21)))


# --------------------------------------------------------------------------------------------
# Mask structure: block tiles and 2:4 groups

# Layer sizes whose weight matrices tiles of 3 divide ((9, 6) and (3, 9)), and whose rows
# groups of 4 divide ((16, 8) and (4, 16)).
BLOCK_SIZES = (6, 9, 3)
TWO_FOUR_SIZES = (8, 16, 4)


def _whole_tiles(mask: torch.Tensor, block: int) -> torch.Tensor:
    """The tile mask of ``mask``, after checking that every tile is kept or pruned whole."""
    rows, cols = mask.shape
    tiles = mask.reshape(rows // block, block, cols // block, block)
    kept = tiles.all(dim=(1, 3))
    assert torch.equal(kept, tiles.any(dim=(1, 3))), "a tile is partly kept"
    return kept


def _kept_tiles(masks, block: int) -> int:
    return sum(int(_whole_tiles(mask, block).sum()) for mask in masks.values())


def _assert_two_four(masks) -> None:
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4)  # along in_features
        assert (groups.sum(dim=2) == 2).all(), name


@pytest.mark.parametrize("block", [1, 3])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_magnitude_block_keeps_the_tiles_of_largest_summed_magnitude(block, scope):
    model = _mlp(BLOCK_SIZES)
    masks = baselines.magnitude(model, 0.6, scope=scope, granularity="block", block_size=block)
    params = prunable_parameters(model)
    sums = {}
    for name, param in params.items():
        matrix = param.detach().abs().double().numpy()
        rows, cols = matrix.shape
        sums[name] = matrix.reshape(rows // block, block, cols // block, block).sum(axis=(1, 3))
    tiles = {name: _whole_tiles(mask, block).numpy() for name, mask in masks.items()}
    groups = [list(params)] if scope == "global" else [[name] for name in params]
    for names in groups:
        kept = np.concatenate([sums[n][tiles[n]] for n in names])
        dropped = np.concatenate([sums[n][~tiles[n]] for n in names])
        assert kept.min() >= dropped.max()
        n_tiles = sum(sums[n].size for n in names)
        assert kept.size == round((1 - 0.6) * n_tiles)


def test_magnitude_two_four_keeps_the_two_largest_of_every_four_inputs():
    model = _mlp(TWO_FOUR_SIZES)
    masks = baselines.magnitude(model, 0.5, granularity="2:4")
    _assert_two_four(masks)
    for name, param in prunable_parameters(model).items():
        magnitude = param.detach().abs().reshape(param.shape[0], -1, 4)
        groups = masks[name].reshape(magnitude.shape)
        kept = magnitude.masked_fill(~groups, float("inf")).amin(dim=2)
        dropped = magnitude.masked_fill(groups, -float("inf")).amax(dim=2)
        assert (kept >= dropped).all(), name


def test_every_score_baseline_takes_the_structure():
    block = {"granularity": "block", "block_size": 3}
    model = _mlp(BLOCK_SIZES)
    batch = _batch(BLOCK_SIZES)
    n_tiles = (9 * 6 + 3 * 9) // 9
    structured = {
        "random": baselines.random(model, 0.5, seed=1, **block),
        "snip": baselines.snip(model, batch, 0.5, **block),
        "grasp": baselines.grasp(model, batch, 0.5, **block),
        "synflow": baselines.synflow(model, 0.5, input_shape=(6,), iterations=3, **block),
    }
    for method, masks in structured.items():
        assert _kept_tiles(masks, 3) == round(0.5 * n_tiles), method
    # The structure is applied to the method's own scores.
    snip_scores = baselines.snip_scores(model, batch)
    expected = masks_from_scores(snip_scores, 0.5, **block)
    assert all(torch.equal(structured["snip"][k], expected[k]) for k in expected)

    model = _mlp(TWO_FOUR_SIZES)
    batch = _batch(TWO_FOUR_SIZES)
    for masks in (
        baselines.random(model, 0.5, granularity="2:4"),
        baselines.snip(model, batch, 0.5, granularity="2:4"),
        baselines.grasp(model, batch, 0.5, granularity="2:4"),
        baselines.synflow(model, 0.5, input_shape=(8,), granularity="2:4"),
    ):
        _assert_two_four(masks)
        assert all(is_two_four(mask) for mask in masks.values())


def test_imp_block_counts_its_rounds_in_tiles():
    data = _toy_data()
    model = _mlp(BLOCK_SIZES)
    round_masks = []
    masks, info = baselines.imp(
        model,
        data,
        0.8,
        granularity="block",
        block_size=3,
        train_kwargs={"steps": 2, "batch_size": 16, "lr": 1e-2},
        callback=lambda r, m, result: round_masks.append(m),
    )
    # 6 + 3 tiles of 9 weights, at least one tile per round (counted in weights, 81 -> 16
    # would take 8 rounds, some of them removing no tile).
    schedule = baselines.imp_schedule(9, 0.8)
    assert schedule == [7, 6, 5, 4, 3, 2] and info.rounds == len(schedule)
    assert [_kept_tiles(m, 3) for m in round_masks] == schedule
    for earlier, later in zip(round_masks, round_masks[1:]):
        assert all((later[k] <= earlier[k]).all() for k in later)
    assert info.granularity == "block" and info.block_size == 3


def test_one_shot_magnitude_two_four():
    data = _toy_data(d_in=8)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    kwargs = {"steps": 3, "batch_size": 16, "lr": 1e-2}
    masks, info = baselines.one_shot_magnitude(
        model, data, 0.5, granularity="2:4", train_kwargs=kwargs
    )
    trained = copy.deepcopy(model)
    train(trained, None, data, **kwargs)
    expected = baselines.magnitude(trained, 0.5, granularity="2:4")
    assert all(torch.equal(masks[k], expected[k]) for k in masks)
    _assert_two_four(masks)
    assert info.granularity == "2:4" and info.block_size is None


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda model, data: baselines.one_shot_magnitude(
                model, data, 0.5, granularity="block", block_size=4
            ),
            r"'0.weight' has shape \(9, 6\).*block_size 4 does not divide",
        ),
        (
            lambda model, data: baselines.imp(model, data, 0.5, granularity="2:4"),
            "imp cannot prune to granularity='2:4'",
        ),
        (
            lambda model, data: baselines.imp(model, data, 0.5, granularity="block"),
            "needs a block_size",
        ),
        (
            lambda model, data: baselines.one_shot_magnitude(model, data, 0.3, granularity="2:4"),
            "sparsity must be 0.5",
        ),
        (lambda model, data: baselines.magnitude(model, 0.5, granularity="tile"), "one of"),
        (
            lambda model, data: baselines.snip(
                model, _batch(BLOCK_SIZES), 0.5, granularity="block", block_size=0
            ),
            "block_size must be at least 1",
        ),
    ],
)
def test_bad_structure_fails_before_any_training(monkeypatch, call, match):
    def no_training(*args, **kwargs):
        raise AssertionError("the structure must be checked before training")

    monkeypatch.setattr(baselines, "train", no_training)
    with pytest.raises(ValueError, match=match):
        call(_mlp(BLOCK_SIZES), _toy_data())


# --------------------------------------------------------------------------------------------
# Bad input: errors that name the problem, never masks from a meaningless score

SCORE_METHODS = {
    "snip": lambda model, batch: baselines.snip(model, batch, 0.5),
    "grasp": lambda model, batch: baselines.grasp(model, batch, 0.5),
}


@pytest.mark.parametrize("method", SCORE_METHODS)
def test_score_batch_class_count_mismatch(method):
    # Labels 0..3 for a model with 3 outputs: torch's "Target 3 is out of bounds" before.
    model = _mlp((8, 16, 3))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\) for a model with 3 "):
        SCORE_METHODS[method](model, _batch(SIZES["aligned"]))


@pytest.mark.parametrize("method", SCORE_METHODS)
def test_score_batch_dtype_mismatch(method):
    batch = _batch(SIZES["aligned"], dtype=torch.float64)
    with pytest.raises(TypeError, match=r"dtype torch.float64.*parameters are torch.float32"):
        SCORE_METHODS[method](_mlp(SIZES["aligned"]), batch)


@pytest.mark.parametrize("method", SCORE_METHODS)
def test_score_batch_shape_mismatch(method):
    x, y = _batch(SIZES["aligned"])
    with pytest.raises(ValueError, match=r"forward failed on inputs of shape \(12, 2, 4\)"):
        SCORE_METHODS[method](_mlp(SIZES["aligned"]), (x.view(-1, 2, 4), y))


@pytest.mark.parametrize("method", SCORE_METHODS)
def test_empty_score_batch(method):
    # All-zero scores: the tie-break alone picked SNIP's masks; GraSP failed on a NaN loss.
    x, y = _batch(SIZES["aligned"])
    with pytest.raises(ValueError, match="the score batch is empty"):
        SCORE_METHODS[method](_mlp(SIZES["aligned"]), (x[:0], y[:0]))


def test_synflow_input_shape_the_model_does_not_take():
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(
        ValueError,
        match=r"forward failed on inputs of shape \(1, 1, 8, 8\).*input_shape=\(1, 8, 8\) is "
        r"not what the model takes",
    ):
        baselines.synflow(model, 0.5, input_shape=(1, 8, 8), iterations=2)


@pytest.mark.parametrize("seed", ["a", 1.7, None])
def test_random_seed_must_be_an_int(seed):
    # 1.7 was truncated to 1 (the masks of seed 1), "a" failed inside int().
    model = _mlp(SIZES["aligned"])
    with pytest.raises(TypeError, match="seed must be an int"):
        baselines.random(model, 0.5, seed=seed)
    with pytest.raises(TypeError, match="seed must be an int"):
        baselines.random_scores(model, seed=seed)
    assert baselines.random(model, 0.5, seed=np.int64(3))["0.weight"].shape == (16, 8)
