"""The training loop: equal to a hand-written torch.optim loop with masking, masked weights
exactly zero, deterministic, exact step counts, presets and clear errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from imc_prune.baselines import random as random_masks
from imc_prune.data import DatasetSplits, iterate_batches
from imc_prune.masks import apply_masks
from imc_prune.train import PRESETS, TrainResult, evaluate, planned_steps, resolve_config, train

# (input, hidden, classes, train samples): aligned and awkward (a partial last batch).
SIZES = {"aligned": (8, 32, 4, 128), "awkward": (5, 7, 3, 101)}
TORCH_OPTIMIZERS = {
    "sgd": lambda params, c: torch.optim.SGD(
        params, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"]
    ),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c["lr"], weight_decay=c["weight_decay"]),
    "adamw": lambda params, c: torch.optim.AdamW(
        params, lr=c["lr"], weight_decay=c["weight_decay"]
    ),
}
HYPER = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    "adam": {"lr": 1e-2, "weight_decay": 1e-3},
    "adamw": {"lr": 1e-2, "weight_decay": 1e-1},
}


def _data(d_in, classes, n_train, n_test=64, seed=0):
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


def _model(d_in, hidden, classes, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, classes))


def _setup(name):
    d_in, hidden, classes, n_train = SIZES[name]
    return _data(d_in, classes, n_train), _model(d_in, hidden, classes)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_equals_torch_optim_with_masking(size, optimizer):
    data, model = _setup(size)
    masks = random_masks(model, 0.7, seed=1)
    reference = copy.deepcopy(model)
    hyper = {"momentum": 0.0, **HYPER[optimizer]}
    batch_size, epochs, seed = 16, 2, 5

    result = train(
        model,
        masks,
        data,
        optimizer=optimizer,
        batch_size=batch_size,
        epochs=epochs,
        seed=seed,
        **HYPER[optimizer],
    )

    # Reference: torch.optim with the gradient masked before and the weights after each step.
    apply_masks(reference, masks)
    opt = TORCH_OPTIMIZERS[optimizer](reference.parameters(), hyper)
    params = dict(reference.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for x, y in iterate_batches(data.train, batch_size, shuffle=True, generator=generator):
            opt.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            for name, mask in masks.items():
                params[name].grad.mul_(mask)
            opt.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    params[name].mul_(mask)

    steps_per_epoch = -(-SIZES[size][3] // batch_size)
    assert result.steps == result.sgd_steps == epochs * steps_per_epoch
    for name, value in model.state_dict().items():
        # fp32: the masked optimizer may order its arithmetic differently (a few ulps/step).
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_masked_weights_exactly_zero(size, optimizer):
    data, model = _setup(size)
    masks = random_masks(model, 0.8, seed=2)
    params = dict(model.named_parameters())
    assert all((params[k][~m] != 0).all() for k, m in masks.items())  # nonzero before
    train(model, masks, data, optimizer=optimizer, steps=12, batch_size=8, **HYPER[optimizer])
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all()
        assert (params[name][mask] != 0).any()


def test_loss_decreases_on_a_separable_problem():
    data = _data(6, 3, 256, n_test=256)
    model = _model(6, 32, 3)
    result = train(model, None, data, lr=1e-2, batch_size=32, epochs=8)
    losses = [entry["train_loss"] for entry in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.final_acc >= 0.9
    assert len(result.history) == 8
    assert [entry["epoch"] for entry in result.history] == list(range(1, 9))
    assert [entry["step"] for entry in result.history] == [8 * e for e in range(1, 9)]
    assert result.mean_last3_acc == pytest.approx(
        sum(e["test_acc"] for e in result.history[-3:]) / 3
    )
    acc, loss = evaluate(model, data.test)
    assert acc == result.final_acc and loss == pytest.approx(result.history[-1]["test_loss"])


def test_same_seed_same_bits_and_global_rng_untouched():
    data, _ = _setup("awkward")
    runs = []
    for seed in (3, 3, 4):
        model = _model(5, 7, 3, seed=0, dropout=0.3)
        rng = torch.get_rng_state()
        train(model, None, data, steps=15, batch_size=8, seed=seed)
        assert torch.equal(torch.get_rng_state(), rng)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_steps_stops_mid_epoch_and_callback_sees_every_step():
    data, model = _setup("awkward")  # 101 samples, batch 16: 7 steps per epoch
    seen = []
    result = train(model, None, data, steps=9, batch_size=16, callback=lambda s, m: seen.append(s))
    assert seen == list(range(10))
    assert result.steps == result.sgd_steps == 9
    assert [(e["epoch"], e["step"]) for e in result.history] == [(1, 7), (2, 9)]
    assert isinstance(result, TrainResult) and result.wall_s > 0


def test_lr_milestones_drop_the_learning_rate():
    data, model = _setup("aligned")
    reference = copy.deepcopy(model)
    train(
        model,
        None,
        data,
        optimizer="sgd",
        lr=0.1,
        momentum=0.0,
        steps=4,
        batch_size=32,
        lr_milestones=(2,),
    )
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for step, (x, y) in enumerate(
        iterate_batches(data.train, 32, shuffle=True, generator=generator)
    ):
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
        if step + 1 == 2:
            opt.param_groups[0]["lr"] = 0.1 * 0.1
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_mode_restored_and_progress_bar_runs():
    data, model = _setup("aligned")
    model.eval()
    train(model, None, data, steps=3, progress=True)
    assert not model.training


def test_presets_and_overrides():
    assert set(PRESETS) >= {
        "lth_lenet",
        "lth_conv2",
        "lth_conv4",
        "lth_conv6",
        "lth_vgg",
        "lth_resnet",
    }
    lenet = resolve_config("lth_lenet")
    assert (lenet["optimizer"], lenet["lr"], lenet["batch_size"], lenet["epochs"]) == (
        "adam",
        1.2e-3,
        60,
        10,
    )
    assert planned_steps(lenet, 60_000) == 10_000
    vgg = resolve_config("lth_vgg", lr=0.05)
    assert (vgg["optimizer"], vgg["lr"], vgg["momentum"], vgg["weight_decay"]) == (
        "sgd",
        0.05,
        0.9,
        1e-4,
    )
    conv = resolve_config("lth_conv2", epochs=3)
    assert (conv["epochs"], conv["steps"], conv["lr"]) == (3, None, 2e-4)
    assert resolve_config(optimizer="adamw", steps=1)["weight_decay"] == 1e-2
    assert resolve_config(optimizer="adamw", steps=1, weight_decay=0.0)["weight_decay"] == 0.0


def test_errors():
    data, model = _setup("aligned")
    with pytest.raises(ValueError, match="unknown preset 'lth_mlp'"):
        train(model, None, data, preset="lth_mlp")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train(model, None, data, optimizer="rmsprop", steps=1)
    with pytest.raises(ValueError, match="not both"):
        train(model, None, data, epochs=1, steps=1)
    with pytest.raises(ValueError, match="epochs= or steps="):
        train(model, None, data)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train(model, None, data, steps=0)
    with pytest.raises(ValueError, match="lr must be finite"):
        train(model, None, data, steps=1, lr=-1.0)
    with pytest.raises(ValueError, match="names no parameter"):
        train(model, {"fc.weight": torch.ones(3, dtype=torch.bool)}, data, steps=1)
    with pytest.raises(ValueError, match="not prunable"):
        train(model, {"0.bias": torch.ones(32, dtype=torch.bool)}, data, steps=1)
    with pytest.raises(TypeError, match="needs data"):
        train(model, None, steps=1)
    with pytest.raises(TypeError, match="pass data.test"):
        evaluate(model, data)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match="training loss"):
        train(model, None, data, optimizer="sgd", lr=1e30, steps=4)
    assert before.keys() == model.state_dict().keys()


# Bad data for the model: a clear error at the first batch, before any step is taken.


def _no_step(step, model):
    assert step == 0, "the error must come before the first step"


def test_class_count_mismatch_names_the_dataset_classes():
    data, _ = _setup("aligned")  # 4 classes
    d_in, hidden, _, _ = SIZES["aligned"]
    model = _model(d_in, hidden, 3)
    with pytest.raises(
        ValueError,
        match=r"targets must lie in \[0, 3\) for a model with 3 outputs; found 3 \(the dataset "
        r"has 4 classes: build the model with num_classes=4\)",
    ):
        train(model, None, data, steps=2, callback=_no_step)


def test_input_shape_mismatch_names_the_samples():
    data, model = _setup("aligned")  # 8 features per sample, shown as (2, 4) images
    x, y = data.train.tensors
    images = DatasetSplits("toy", TensorDataset(x.view(-1, 2, 4), y), data.test, 4, (2, 4))
    with pytest.raises(
        ValueError,
        match=r"forward failed on inputs of shape \(60, 2, 4\): .*the data's samples are "
        r"\(2, 4\) \(load with flatten=True for an MLP, or build the model with "
        r"input_shape=\(2, 4\)\)",
    ):
        train(model, None, images, steps=2, callback=_no_step)


def test_dtype_mismatch_names_both_dtypes():
    data, model = _setup("aligned")
    x, y = data.train.tensors
    doubles = DatasetSplits("toy", TensorDataset(x.double(), y), data.test, 4, (8,))
    with pytest.raises(TypeError, match=r"dtype torch.float64.*parameters are torch.float32"):
        train(model, None, doubles, steps=2, callback=_no_step)


def test_float_targets_are_refused():
    # Cross-entropy took them as soft labels and the accuracy compared argmax with floats.
    data, model = _setup("aligned")
    x, _ = data.train.tensors
    soft = DatasetSplits("toy", TensorDataset(x, torch.rand(len(x), 4)), data.test, 4, (8,))
    with pytest.raises(TypeError, match="targets must be integer labels, got dtype torch.float32"):
        train(model, None, soft, steps=2, callback=_no_step)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_device_that_is_not_there():
    data, model = _setup("aligned")
    with pytest.raises(ValueError, match="sees no CUDA device; use cpu"):
        train(model, None, data, steps=1, device="cuda")
    with pytest.raises(ValueError, match="sees no CUDA device; use cpu"):
        evaluate(model, data.test, device="cuda")


def test_eval_batch_size_is_checked_before_training():
    data, model = _setup("aligned")
    with pytest.raises(ValueError, match="eval_batch_size must be a positive int, got 0"):
        train(model, None, data, steps=2, eval_batch_size=0, callback=_no_step)
