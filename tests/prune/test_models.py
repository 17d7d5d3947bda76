"""imc_prune.models: shapes, hand-counted parameters, seeding, and the fused-HVP contract.

Parameter counts are computed here from the layer list of each paper (k*k*c_in*c_out
weights plus biases or BatchNorm affine pairs), independently of the builder.
"""

import functools
import math

import pytest
import torch
from torch import nn

import imc_kernels
from imc_prune.models import MODEL_NAMES, build_model

# nn.Sequential leaves the fused engine has rules for (imc_kernels.hvp.fused docstring).
FUSED_LEAVES = (nn.Flatten, nn.Linear, nn.ReLU, nn.Conv2d, nn.MaxPool2d)
VGG_LEAVES = FUSED_LEAVES + (nn.BatchNorm2d, nn.AdaptiveAvgPool2d)


@functools.cache
def _model(name: str, input_shape: tuple, num_classes: int = 10) -> nn.Module:
    """Build each configuration once per session (VGG-16 and ResNet-18 take ~1 s)."""
    return build_model(name, num_classes=num_classes, input_shape=input_shape, seed=0)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv(c_in, c_out, k=3, bias=True):
    return k * k * c_in * c_out + (c_out if bias else 0)


def _fc(n_in, n_out):
    return n_in * n_out + n_out


def _bn(c):
    return 2 * c


@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 32, 32)], ids=["fmnist", "cifar"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape(name, input_shape):
    model = _model(name, input_shape)
    x = torch.randn(2, *input_shape)
    with torch.no_grad():
        out = model(x)
        model.eval()
        out_eval = model(x)
        model.train()
    assert out.shape == out_eval.shape == (2, 10)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["lenet300100", "conv2", "conv4", "conv6", "vgg11", "resnet20"])
def test_awkward_input_and_class_count(name):
    # non-square, not a power of two, 7 classes
    model = build_model(name, num_classes=7, input_shape=(2, 20, 26), seed=1)
    with torch.no_grad():
        assert model(torch.randn(3, 2, 20, 26)).shape == (3, 7)


@pytest.mark.parametrize("name", ["conv2", "conv4", "conv6"])
@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 32, 32), (2, 20, 26), (1, 8, 8)])
def test_conv_n_first_dense_layer_takes_the_traced_feature_map(name, input_shape):
    model = _model(name, input_shape)
    flatten = next(i for i, m in enumerate(model) if isinstance(m, nn.Flatten))
    with torch.no_grad():
        features = model[:flatten](torch.zeros(1, *input_shape))
    assert model[flatten + 1].in_features == features[0].numel()
    widths = [m.out_channels for m in model if isinstance(m, nn.Conv2d)]
    assert widths == {"conv2": [64, 64], "conv4": [64, 64, 128, 128]}.get(
        name, [64, 64, 128, 128, 256, 256]
    )
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [256, 256, 10]
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in convs)


def test_parameter_counts_against_hand_counts():
    # LeNet-300-100 on 784 inputs: the LTH paper's 266K
    lenet = _fc(784, 300) + _fc(300, 100) + _fc(100, 10)
    assert lenet == 266_610
    assert _n_params(_model("lenet300100", (1, 28, 28))) == lenet
    assert _n_params(build_model("lenet300100", input_shape=(784,))) == lenet

    head = _fc(256, 256) + _fc(256, 10)
    conv2 = _conv(3, 64) + _conv(64, 64) + _fc(64 * 16 * 16, 256) + head
    assert _n_params(_model("conv2", (3, 32, 32))) == conv2
    assert conv2 == pytest.approx(4.3e6, rel=0.01)  # Frankle & Carbin, Fig. 2
    conv4 = _conv(3, 64) + _conv(64, 64) + _conv(64, 128) + _conv(128, 128)
    conv4 += _fc(128 * 8 * 8, 256) + head
    assert _n_params(_model("conv4", (3, 32, 32))) == conv4
    assert conv4 == pytest.approx(2.4e6, rel=0.02)
    # Conv-2 on Fashion-MNIST: 28 -> 14 after the pool
    conv2_fmnist = _conv(1, 64) + _conv(64, 64) + _fc(64 * 14 * 14, 256) + head
    assert _n_params(_model("conv2", (1, 28, 28))) == conv2_fmnist

    # ResNet-20 (He et al. 2016, option A): stem, 3 stages x 3 blocks x 2 convs, BN, FC
    resnet20 = _conv(3, 16, bias=False) + _bn(16) + _fc(64, 10)
    for c_in, c_out in ((16, 16), (16, 32), (32, 64)):
        resnet20 += _conv(c_in, c_out, bias=False) + 5 * _conv(c_out, c_out, bias=False)
        resnet20 += 6 * _bn(c_out)
    assert resnet20 == 269_722
    assert _n_params(_model("resnet20", (3, 32, 32))) == resnet20
    assert resnet20 == pytest.approx(0.27e6, rel=0.01)


def test_resnet_shortcuts():
    resnet20 = _model("resnet20", (3, 32, 32))
    shortcuts = [m.shortcut for m in resnet20.modules() if hasattr(m, "shortcut")]
    assert len(shortcuts) == 9
    assert sum(_n_params(s) for s in shortcuts) == 0  # option A: no parameters
    # option A = stride-2 subsampling, zero channels split around the identity's
    padded = shortcuts[3]
    x = torch.randn(2, 16, 8, 8)
    out = padded(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    resnet18 = _model("resnet18", (3, 32, 32))
    blocks = [m for m in resnet18.modules() if hasattr(m, "shortcut")]
    projections = [m.shortcut for m in blocks if isinstance(m.shortcut, nn.Sequential)]
    assert len(projections) == 3  # option B where width and resolution change
    assert _n_params(resnet18) == 11_173_962  # the usual CIFAR ResNet-18 count


@pytest.mark.parametrize("name", ["lenet300100", "conv2", "resnet20"])
def test_seed_determinism(name):
    a = build_model(name, seed=5)
    b = build_model(name, seed=5)
    c = build_model(name, seed=6)
    sb, sc = b.state_dict(), c.state_dict()
    for key, pa in a.state_dict().items():
        pb, pc = sb[key], sc[key]
        assert torch.equal(pa, pb), key
        if key.endswith("weight") and pa.dim() > 1:
            assert not torch.equal(pa, pc), key
    # the global RNG is neither used nor advanced by a seeded build
    state = torch.get_rng_state()
    build_model(name, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    # seed=None draws from the global RNG: the same as seeding it first
    torch.manual_seed(5)
    d = build_model(name)
    assert all(torch.equal(pa, pd) for pa, pd in zip(a.parameters(), d.parameters()))


def test_initialisation_scales():
    # Glorot normal for LeNet: std = sqrt(2 / (fan_in + fan_out)); 235,200 samples give a
    # relative standard error of ~0.15%, so 2% is loose.
    lenet = _model("lenet300100", (1, 28, 28))
    first = lenet[1]
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / (784 + 300)), rel=0.02)
    assert not first.bias.any()
    # He normal (fan-in) for ResNets: std = sqrt(2 / (9 * c_in))
    conv = _model("resnet20", (3, 32, 32)).stages[2][1].conv1  # 64 -> 64, 36,864 weights
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.03)


def _operator_in_eval_mode(model, batch):
    """The Hessian operator with engine="auto" on an eval-mode model (its documented mode)."""
    model.eval()
    try:
        return imc_kernels.HessianOperator(model, None, batch, engine="auto")
    finally:
        model.train()


@pytest.mark.parametrize(
    "name,input_shape",
    [
        ("lenet300100", (1, 28, 28)),
        ("conv2", (1, 28, 28)),
        ("conv4", (3, 32, 32)),
        ("conv6", (1, 28, 28)),
        ("vgg11", (1, 8, 8)),
    ],
)
def test_sequential_models_run_on_the_fused_hvp_engine(name, input_shape):
    model = _model(name, input_shape)
    assert isinstance(model, nn.Sequential)
    allowed = VGG_LEAVES if name.startswith("vgg") else FUSED_LEAVES
    assert all(isinstance(m, allowed) for m in model), [type(m).__name__ for m in model]
    batch = (torch.randn(2, *input_shape), torch.tensor([1, 7]))
    operator = _operator_in_eval_mode(model, batch)
    assert operator.engine == "fused", operator.engine_reason
    assert operator.dim == _n_params(model)


def test_resnet_falls_back_to_the_func_engine():
    model = _model("resnet20", (1, 28, 28))
    batch = (torch.randn(2, 1, 28, 28), torch.tensor([0, 3]))
    operator = _operator_in_eval_mode(model, batch)
    assert operator.engine == "func" and "nn.Sequential" in operator.engine_reason


def test_names_are_normalised_and_unknown_names_listed():
    assert _n_params(build_model("LeNet-300-100", seed=0)) == 266_610
    assert isinstance(build_model("Conv_2", input_shape=(3, 32, 32)), nn.Sequential)
    with pytest.raises(ValueError, match="unknown model 'resnet50'") as info:
        build_model("resnet50")
    for name in MODEL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"name": "conv6", "input_shape": (3, 4, 4)}, "at least 8x8"),
        ({"name": "conv2", "input_shape": (784,)}, r"needs image inputs \(C, H, W\)"),
        ({"name": "lenet300100", "input_shape": (1, 0, 28)}, "positive ints"),
        ({"name": "lenet300100", "input_shape": (28, 28)}, r"\(C, H, W\) or \(D,\)"),
        ({"name": "lenet300100", "input_shape": "abc"}, "sequence of ints"),
        ({"name": "lenet300100", "num_classes": 0}, "num_classes must be a positive int"),
        ({"name": "lenet300100", "seed": 1.5}, "seed must be an int"),
    ],
)
def test_bad_arguments(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        build_model(name, **kwargs)
