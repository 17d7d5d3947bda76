"""The networks of the pruning experiments, adapted to the input shape of the dataset.

=============  ===========================================================  ===========  ==========
name           architecture                                                 params       fused HVP
                                                                            (3x32x32)
=============  ===========================================================  ===========  ==========
lenet300100    Flatten, FC 300, 100, classes (LeCun et al. 1998)            953,010 [1]  yes
conv2          [conv 64, 64, pool], FC 256, 256, classes                    4,301,642    yes
conv4          [64, 64, pool, 128, 128, pool], FC 256, 256, classes         2,425,930    yes
conv6          [64, 64, pool, 128, 128, pool, 256, 256, pool], FC 256...    2,262,602    yes
vgg11          VGG-11 with BatchNorm, global average pool, FC classes       9,228,362    eval mode
vgg16          VGG-16 with BatchNorm, global average pool, FC classes       14,724,042   eval mode
resnet20       He et al. 2016 CIFAR ResNet (3 stages 16/32/64, option A)    269,722      no (func)
resnet18       ResNet-18, CIFAR stem (3x3 conv, no max-pool), option B      11,173,962   no (func)
=============  ===========================================================  ===========  ==========

[1] 266,610 for 1x28x28 inputs (784 features, the LTH paper's count).

Conv-2/4/6 are the networks of Frankle & Carbin 2019 (Fig. 2): 3x3 convolutions with padding
1 and ReLU, a 2x2 max-pool after each pair, then fully connected 256, 256 and the classifier.
Conv-2 and Conv-4 match the paper's 4.3M and 2.4M parameters; Conv-6 has 2.26M (the paper's
figure says 1.7M, which no reading of the stated layers reproduces). The first fully
connected layer takes the flattened feature map, whose size follows the input: Conv-2 on
1x28x28 Fashion-MNIST flattens 64x14x14 = 12,544 features.

VGG drops the max-pools that would shrink the feature map below 1x1 (so 28x28 and 8x8 inputs
work) and ends, as Frankle & Carbin's CIFAR VGG does, with a global average pool and one
linear layer. Convolutions that feed a BatchNorm have no bias (the BatchNorm shift is one).

ResNet-20 uses He et al.'s option A shortcut for CIFAR: where the resolution halves and the
width doubles, the identity is subsampled (stride 2) and zero-padded in channels, so
shortcuts have no parameters (0.27M in all, as in the paper). ResNet-18 uses option B (a
strided 1x1 convolution with BatchNorm), as the ImageNet ResNet-18 does, with a 3x3 stride-1
stem and no max-pool for 32x32 inputs.

Initialisation: Gaussian Glorot weights and zero biases for LeNet and Conv-N (as in the LTH
paper); He (Kaiming) normal fan-in weights for VGG and ResNet convolutions and linear layers,
zero biases, BatchNorm scale 1 and shift 0.

LeNet, Conv-N and VGG are plain ``nn.Sequential`` of Flatten, Linear, ReLU, Conv2d,
MaxPool2d (plus BatchNorm2d and AdaptiveAvgPool2d for VGG), the layers imc_kernels' fused
Hessian-vector-product engine has rules for; ResNets have skip connections and run on its
``torch.func`` engine.

Example:
    >>> model = build_model("conv2", input_shape=(3, 32, 32), seed=0)
    >>> sum(p.numel() for p in model.parameters())
    4301642
    >>> model(torch.randn(5, 3, 32, 32)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODEL_NAMES", "build_model"]

MODEL_NAMES = (
    "lenet300100",
    "conv2",
    "conv4",
    "conv6",
    "vgg11",
    "vgg16",
    "resnet20",
    "resnet18",
)

# Conv-N: output channels of each 3x3 convolution; a 2x2 max-pool follows every pair.
_CONV_WIDTHS = {
    "conv2": (64, 64),
    "conv4": (64, 64, 128, 128),
    "conv6": (64, 64, 128, 128, 256, 256),
}
# VGG (Simonyan & Zisserman 2015, configurations A and D): the conv widths of each of the
# five stages; a 2x2 max-pool ends every stage.
_VGG_STAGES = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (1, 28, 28),
    seed: int | None = None,
) -> nn.Module:
    """Build one of the networks of :data:`MODEL_NAMES` for inputs of ``input_shape``.

    Args:
        name: a name of :data:`MODEL_NAMES` (case, ``-`` and ``_`` are ignored:
            ``"LeNet-300-100"`` and ``"resnet_20"`` work).
        num_classes: number of output logits.
        input_shape: shape of one input, ``(C, H, W)``; LeNet also takes ``(D,)``.
        seed: seed of the initialisation (the same seed gives the same weights; the global
            RNG is left untouched). None draws from the global RNG.

    Returns:
        The model in training mode, on the CPU, float32.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), a bad
            ``num_classes`` or ``input_shape``, or an input too small for the network.

    Example:
        >>> model = build_model("lenet300100", seed=0)
        >>> sum(p.numel() for p in model.parameters())
        266610
    """
    canonical = _canonical_name(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    shape = _check_input_shape(input_shape, canonical)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")

    def construct() -> nn.Module:
        return _BUILDERS[canonical](canonical, num_classes, shape)

    if seed is None:
        return construct()
    # A private RNG state: the same seed gives the same weights whatever ran before, and the
    # caller's global RNG stream is not advanced.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return construct()


def _canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return key


def _check_input_shape(input_shape, name: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a sequence of ints, got {input_shape!r}") from None
    if any(s < 1 for s in shape) or len(shape) not in (1, 3):
        raise ValueError(f"input_shape must be (C, H, W) or (D,) of positive ints, got {shape}")
    if len(shape) == 1 and name != "lenet300100":
        raise ValueError(
            f"{name} needs image inputs (C, H, W), got input_shape={shape} (load the dataset "
            "with flatten=False)"
        )
    return shape


# --------------------------------------------------------------------------------------
# LeNet-300-100 and Conv-2/4/6 (Frankle & Carbin 2019)


def _glorot_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)


def _lenet(name: str, num_classes: int, shape: tuple[int, ...]) -> nn.Sequential:
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(shape), 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )
    _glorot_init(model)
    return model


def _conv_n(name: str, num_classes: int, shape: tuple[int, ...]) -> nn.Sequential:
    widths = _CONV_WIDTHS[name]
    channels, height, width = shape
    pools = len(widths) // 2
    if min(height, width) < 2**pools:
        raise ValueError(
            f"{name} halves the image {pools} times and needs at least "
            f"{2**pools}x{2**pools} inputs, got {height}x{width}"
        )
    layers: list[nn.Module] = []
    for i, out_channels in enumerate(widths):
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU()]
        channels = out_channels
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
    layers += [
        nn.Flatten(),
        nn.Linear(channels * height * width, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    ]
    model = nn.Sequential(*layers)
    _glorot_init(model)
    return model


# --------------------------------------------------------------------------------------
# VGG-11/16 for CIFAR


def _he_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _vgg(name: str, num_classes: int, shape: tuple[int, ...]) -> nn.Sequential:
    channels, height, width = shape
    layers: list[nn.Module] = []
    for stage in _VGG_STAGES[name]:
        for out_channels in stage:
            layers += [
                nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
            channels = out_channels
        # Skip pools that would leave no pixel: 28x28 keeps 4 of VGG's 5, 8x8 keeps 3.
        if min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    model = nn.Sequential(*layers)
    _he_init(model)
    return model


# --------------------------------------------------------------------------------------
# ResNets for CIFAR


class _PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Pad the channel dimension (F.pad lists the last dimension first).
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, added to a shortcut, then ReLU (He et al. 2016).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (2 halves the resolution).
        shortcut: ``"A"`` (parameter-free subsample and zero-pad) or ``"B"`` (1x1 conv and
            BatchNorm) where the shape changes; identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, stages of :class:`BasicBlock`, global average pool, FC.

    Args:
        in_channels: input image channels.
        widths: output channels of each stage (the first stage keeps the resolution, each
            later one halves it).
        blocks: number of blocks in each stage.
        num_classes: number of logits.
        shortcut: ``"A"`` or ``"B"`` (see :class:`BasicBlock`).
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        num_classes: int,
        shortcut: str,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        channels = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def _resnet20(name: str, num_classes: int, shape: tuple[int, ...]) -> ResNet:
    model = ResNet(shape[0], (16, 32, 64), (3, 3, 3), num_classes, shortcut="A")
    _he_init(model)
    return model


def _resnet18(name: str, num_classes: int, shape: tuple[int, ...]) -> ResNet:
    model = ResNet(shape[0], (64, 128, 256, 512), (2, 2, 2, 2), num_classes, shortcut="B")
    _he_init(model)
    return model


_BUILDERS: dict[str, Callable[[str, int, tuple[int, ...]], nn.Module]] = {
    "lenet300100": _lenet,
    "conv2": _conv_n,
    "conv4": _conv_n,
    "conv6": _conv_n,
    "vgg11": _vgg,
    "vgg16": _vgg,
    "resnet20": _resnet20,
    "resnet18": _resnet18,
}
