"""Fashion-MNIST for the benchmarks, read from local IDX files (no downloads at run time).

Where the files are looked for, in order:

1. ``$IMC_DATA`` (a folder holding the four ``*-idx?-ubyte[.gz]`` files, or a parent with a
   ``fashion-mnist`` folder);
2. ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install dataset-fashion-mnist``).

If neither has them, :func:`load_fashion_mnist` returns random images with random labels and
says so in :attr:`Dataset.source` (the benchmark prints it as a warning): timings stay
meaningful, spectra do not look like a trained network's.

Images come back as float32 ``(N, 1, 28, 28)`` scaled to ``[0, 1]`` and standardized with
the training set's mean and standard deviation (0.2860, 0.3530), labels as int64 in
``[0, 10)``. Reading and validating the files is :mod:`imc_prune.data`'s job
(``read_idx``, ``read_fashion_mnist``, ``data_folders``); this module adds the benchmark's
random stand-in and its fixed standardisation constants.

    data = load_fashion_mnist("train")
    data.images.shape, data.labels.shape  # (60000, 1, 28, 28), (60000,)
    data.source  # '/usr/share/datasets/fashion-mnist', or 'random data (...)'
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from imc_prune.data import DEBIAN_FASHION_MNIST, DatasetNotFoundError, read_fashion_mnist, read_idx
from imc_prune.data import data_folders as _data_folders

__all__ = [
    "DEBIAN_DIR",
    "FILES",
    "MEAN",
    "STD",
    "Dataset",
    "data_folders",
    "load_fashion_mnist",
    "read_idx",
]

DEBIAN_DIR: Path = DEBIAN_FASHION_MNIST
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Mean and standard deviation of the 60,000 training images in [0, 1] (computed once from
# the Debian files; the usual published values).
MEAN, STD = 0.2860, 0.3530


@dataclasses.dataclass
class Dataset:
    """Images ``(N, 1, 28, 28)`` float32 (standardized), labels ``(N,)`` int64, and where
    they came from (a folder, or a sentence starting with ``"random"`` for the fallback)."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str

    @property
    def is_random(self) -> bool:
        return self.source.startswith("random")


def data_folders() -> list[Path]:
    """Folders searched for the IDX files, in order."""
    return _data_folders()


def load_fashion_mnist(split: str = "train", *, limit: int | None = None, seed: int = 0) -> Dataset:
    """The Fashion-MNIST ``split`` ("train" or "test"), or random stand-in data.

    Args:
        split: "train" (60,000 images) or "test" (10,000).
        limit: keep only the first ``limit`` images.
        seed: seed of the random stand-in (used only when the files are missing).

    Returns:
        A :class:`Dataset`.

    Raises:
        ValueError: a bad split, or files that are there but malformed.
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        images, labels, folder = read_fashion_mnist(split)
    except DatasetNotFoundError:
        n = limit or (60_000 if split == "train" else 10_000)
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(n, 1, 28, 28, generator=generator)
        labels = torch.randint(0, 10, (n,), generator=generator)
        searched = ", ".join(str(f) for f in data_folders())
        return Dataset(images, labels, f"random data (Fashion-MNIST not found in {searched})")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = (images.to(torch.float32) / 255.0 - MEAN) / STD
    return Dataset(images.unsqueeze(1), labels, str(folder))
