"""Benchmark models: deterministic by seed, eval mode, all taking (N, 1, 28, 28) images.

Every model is an ``nn.Sequential`` (what the fused HVP engine walks) that starts with the
image and ends with 10 logits for cross-entropy:

============  ============================================================  ==========
name          layers                                                        parameters
============  ============================================================  ==========
mlp_lenet     Flatten, 784-300-ReLU-100-ReLU-10 (LeNet-300-100)               266,610
cnn_small     Conv 1->16, ReLU, pool, Conv 16->32, ReLU, pool, Linear 1568-10   20,490
mlp_wide      Flatten, 784-1024-GELU-1024-GELU-10                           1,863,690
cnn_deep      2x(Conv, eval BatchNorm, ReLU) x2 widths 32/64 + pools, 3136-256-10  871,018
============  ============================================================  ==========

``mlp_wide`` uses GELU (exact, erf form) on purpose: its second derivative is non-zero, so the
Hessian products exercise the ``act''(z) * Rz * g_a`` term that vanishes for ReLU.
``cnn_deep`` has eval-mode BatchNorm2d whose running statistics are calibrated on one random
batch at construction (so they are not the trivial mean 0 / variance 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
N_CLASSES = 10


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    # Build on the CPU under a private RNG state: the same seed gives the same weights on
    # every device, and the caller's global RNG is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def mlp_lenet(seed: int = 0) -> nn.Sequential:
    """LeNet-300-100: 784-300-ReLU-100-ReLU-10, 266,610 parameters."""
    model = _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, N_CLASSES),
        ),
    )
    _expect_params(model, 266_610, "mlp_lenet")
    return model


def cnn_small(seed: int = 0) -> nn.Sequential:
    """Two 3x3 convs (16, 32 channels) with max-pools and a linear head, 20,490 parameters."""
    model = _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, N_CLASSES),
        ),
    )
    _expect_params(model, 20_490, "cnn_small")
    return model


def mlp_wide(seed: int = 0) -> nn.Sequential:
    """784-1024-GELU-1024-GELU-10, 1,863,690 parameters (GELU: non-zero second derivative)."""
    model = _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 1024),
            nn.GELU(),
            nn.Linear(1024, 1024),
            nn.GELU(),
            nn.Linear(1024, N_CLASSES),
        ),
    )
    _expect_params(model, 1_863_690, "mlp_wide")
    return model


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


def cnn_deep(seed: int = 0) -> nn.Sequential:
    """Conv-4 with eval-mode BatchNorm: 32, 32, pool, 64, 64, pool, 3136-256-10.

    871,018 parameters. The BatchNorm running statistics come from one train-mode forward
    over 256 random images (cumulative average, ``momentum=None``), so normalisation is a
    real affine map in eval mode.
    """

    def build() -> nn.Sequential:
        model = nn.Sequential(
            *_conv_block(1, 32),
            *_conv_block(32, 32),
            nn.MaxPool2d(2),
            *_conv_block(32, 64),
            *_conv_block(64, 64),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 256),
            nn.ReLU(),
            nn.Linear(256, N_CLASSES),
        )
        calibration = torch.randn(256, *IMAGE_SHAPE)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None
        model.train()
        with torch.no_grad():
            model(calibration)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
        return model

    model = _seeded(seed, build)
    _expect_params(model, 871_018, "cnn_deep")
    return model


def _expect_params(model: nn.Module, expected: int, name: str) -> None:
    count = sum(p.numel() for p in model.parameters())
    if count != expected:
        raise AssertionError(f"{name} has {count:,} parameters, expected {expected:,}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A benchmark model and its batch sizes (full runs and ``--quick`` runs)."""

    build: Callable[[int], nn.Sequential]
    batch: int
    quick_batch: int
    description: str


MODELS: dict[str, ModelSpec] = {
    "mlp_lenet": ModelSpec(mlp_lenet, 1024, 256, "784-300-100-10 ReLU MLP"),
    "cnn_small": ModelSpec(cnn_small, 512, 64, "2-conv CNN, 20K params"),
    "mlp_wide": ModelSpec(mlp_wide, 1024, 64, "784-1024-1024-10 GELU MLP"),
    "cnn_deep": ModelSpec(cnn_deep, 512, 16, "Conv-4 + BatchNorm (eval), 871K params"),
}


def build_model(name: str, seed: int = 0, device: torch.device | str = "cpu") -> nn.Sequential:
    """The registered model ``name``, initialised from ``seed``, on ``device``, eval mode."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name].build(seed).to(device)


def batch_size(name: str, quick: bool = False) -> int:
    spec = MODELS[name]
    return spec.quick_batch if quick else spec.batch


def make_batch(
    name: str, batch: int, seed: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random ``(images, targets)``: images ~ N(0, 1) float32 of shape
    ``(batch, 1, 28, 28)``, int64 targets uniform in ``[0, 10)``.

    Drawn on the CPU from a generator seeded with ``seed`` (same data on every device), then
    moved to ``device``. ``name`` is checked against the registry; every model takes images.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, *IMAGE_SHAPE, generator=generator)
    targets = torch.randint(0, N_CLASSES, (batch,), generator=generator)
    return images.to(device), targets.to(device)
